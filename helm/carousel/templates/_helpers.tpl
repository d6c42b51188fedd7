{{/*
Names. Kubernetes names stop at 63 characters; KubeRay appends suffixes such as
"-head-svc" and "-<group>-worker-xxxxx" to the RayCluster name, hence the shorter cuts.
*/}}
{{- define "carousel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "carousel.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "carousel.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "carousel.rayClusterName" -}}
{{- printf "%s-ray" (include "carousel.fullname" .) | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/* KubeRay derives the submitter Job and cluster names from the RayJob name. */}}
{{- define "carousel.rayJobName" -}}
{{- printf "%s-%s" (include "carousel.fullname" .) .Values.job.name | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "carousel.mlflowName" -}}
{{- printf "%s-mlflow" (include "carousel.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "carousel.serviceAccountName" -}}
{{- printf "%s-ray" (include "carousel.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels. Every pod of the release carries the selector labels, which the NetworkPolicy
uses to tell the release's own pods apart. Ray pods keep KubeRay's own
app.kubernetes.io/name, so the selector is instance + part-of, not name.
*/}}
{{- define "carousel.releaseSelector" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: carousel
{{- end }}

{{- define "carousel.labels" -}}
helm.sh/chart: {{ include "carousel.chart" . }}
{{ include "carousel.releaseSelector" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Pod labels: KubeRay adds its own to Ray pods, and nothing here may change with the chart version. */}}
{{- define "carousel.podLabels" -}}
{{ include "carousel.releaseSelector" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{/* Labels for objects the chart creates directly (not Ray pods). */}}
{{- define "carousel.objectLabels" -}}
{{ include "carousel.labels" . }}
app.kubernetes.io/name: {{ include "carousel.name" . }}
{{- end }}

{{- define "carousel.mlflowSelector" -}}
{{ include "carousel.releaseSelector" . }}
app.kubernetes.io/name: {{ include "carousel.name" . }}
app.kubernetes.io/component: mlflow
{{- end }}

{{- define "carousel.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "carousel.mlflowImage" -}}
{{- $repo := default .Values.image.repository .Values.mlflow.image.repository }}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.mlflow.image.tag }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}

{{/* Secret names: an existing Secret when given, else the one the chart creates. */}}
{{- define "carousel.rayAuthSecret" -}}
{{- default (printf "%s-ray-auth" (include "carousel.fullname" .)) .Values.ray.auth.existingSecret }}
{{- end }}

{{- define "carousel.mlflowAdminSecret" -}}
{{- default (printf "%s-admin" (include "carousel.mlflowName" .)) .Values.mlflow.auth.existingSecret }}
{{- end }}

{{- define "carousel.mlflowClientSecret" -}}
{{- default (include "carousel.mlflowAdminSecret" .) .Values.mlflow.auth.clientExistingSecret }}
{{- end }}

{{- define "carousel.mlflowStoreSecret" -}}
{{- default (printf "%s-store" (include "carousel.mlflowName" .)) .Values.mlflow.backendStore.existingSecret }}
{{- end }}

{{- define "carousel.mlflowStoreSecretKey" -}}
{{- if .Values.mlflow.backendStore.existingSecret }}
{{- .Values.mlflow.backendStore.existingSecretKey }}
{{- else -}}
backend-store-uri
{{- end }}
{{- end }}

{{/* sqlite is the quick start: no external database was named. */}}
{{- define "carousel.mlflowUsesSqlite" -}}
{{- if and (not .Values.mlflow.backendStore.existingSecret) (not .Values.mlflow.backendStore.uri) }}true{{ end }}
{{- end }}

{{- define "carousel.mlflowUsesPVC" -}}
{{- if or (include "carousel.mlflowUsesSqlite" .) (eq .Values.mlflow.artifacts.type "pvc") }}true{{ end }}
{{- end }}

{{- define "carousel.mlflowClaimName" -}}
{{- default (include "carousel.mlflowName" .) .Values.mlflow.persistence.existingClaim }}
{{- end }}

{{- define "carousel.storageClaimName" -}}
{{- default (printf "%s-storage" (include "carousel.fullname" .)) .Values.storage.pvc.existingClaim }}
{{- end }}

{{/* The MLflow URL the Ray pods log to. */}}
{{- define "carousel.mlflowTrackingUri" -}}
{{- if .Values.mlflow.enabled }}
{{- printf "http://%s.%s.svc.%s:%d" (include "carousel.mlflowName" .) .Release.Namespace .Values.clusterDomain (int .Values.mlflow.port) }}
{{- else }}
{{- .Values.mlflow.trackingUri }}
{{- end }}
{{- end }}

{{/* Root of shared storage as Ray sees it: the PVC mount or the object-store URI. */}}
{{- define "carousel.storageRoot" -}}
{{- if eq .Values.storage.type "pvc" }}
{{- .Values.storage.mountPath | trimSuffix "/" }}
{{- else }}
{{- .Values.storage.objectStore.uri | trimSuffix "/" }}
{{- end }}
{{- end }}

{{/* A path under shared storage unless it is already absolute or a URI. */}}
{{- define "carousel.storagePath" -}}
{{- $path := index . 1 }}
{{- if or (hasPrefix "/" $path) (contains "://" $path) }}
{{- $path }}
{{- else }}
{{- printf "%s/%s" (include "carousel.storageRoot" (index . 0)) ($path | trimPrefix "./") }}
{{- end }}
{{- end }}

{{/*
Security contexts. They are not values on purpose: the chart's promise is that every
pod runs non-root, unprivileged, with no capabilities and the runtime's seccomp profile.
*/}}
{{- define "carousel.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Pass (list $ readOnlyRootFilesystem). */}}
{{- define "carousel.containerSecurityContext" -}}
{{- $root := index . 0 -}}
runAsNonRoot: true
runAsUser: {{ $root.Values.podSecurity.runAsUser }}
runAsGroup: {{ $root.Values.podSecurity.runAsGroup }}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: {{ index . 1 }}
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Environment every Ray container gets: tracking, storage credentials, writable caches. */}}
{{- define "carousel.rayEnv" -}}
- name: MLFLOW_TRACKING_URI
  value: {{ include "carousel.mlflowTrackingUri" . | quote }}
{{- if or .Values.mlflow.enabled .Values.mlflow.auth.clientExistingSecret }}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ include "carousel.mlflowClientSecret" . }}
      key: username
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "carousel.mlflowClientSecret" . }}
      key: password
{{- end }}
{{- /* With a read-only root, library caches (torch, triton, DeepSpeed ops) must land on /tmp. */}}
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: TRITON_HOME
  value: /tmp/.triton
{{- if eq .Values.storage.type "objectStore" }}
{{- with .Values.storage.objectStore }}
{{- if .endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ .endpointUrl | quote }}
{{- end }}
{{- if .region }}
- name: AWS_DEFAULT_REGION
  value: {{ .region | quote }}
{{- end }}
{{- if .existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: AWS_SECRET_ACCESS_KEY
{{- end }}
{{- end }}
{{- end }}
{{- /* Ray's log monitor rescans its log directory once a second instead of on every 0.1 s pass, as
`carousel cluster up` has it (cluster/local.py QUIET_LOG_MONITOR): on small CPU nodes it was the busiest
process besides the workers. A new file's lines arrive up to 1 s later; nothing is lost. A variable
of the same name in ray.extraEnv replaces ours (Kubernetes keeps one entry per name). */}}
{{- $userEnv := list }}
{{- range .Values.ray.extraEnv }}{{ $userEnv = append $userEnv .name }}{{ end }}
{{- range $name, $value := dict "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD" "0" "LOG_NAME_UPDATE_INTERVAL_S" "1.0" }}
{{- if not (has $name $userEnv) }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}
{{- with .Values.ray.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Volumes of a Ray pod. The names "ray-logs" and "shared-mem" are KubeRay's own: with them
KubeRay shares /tmp/ray with the autoscaler sidecar instead of adding a second volume.
Pass (dict "root" $ "sharedMemory" size "jobSpec" bool).
*/}}
{{- define "carousel.rayVolumes" -}}
{{- $root := .root -}}
- name: ray-logs
  emptyDir: {}
- name: tmp
  emptyDir: {}
- name: shared-mem
  emptyDir:
    medium: Memory
    sizeLimit: {{ .sharedMemory }}
{{- if eq $root.Values.storage.type "pvc" }}
- name: storage
  persistentVolumeClaim:
    claimName: {{ include "carousel.storageClaimName" $root }}
{{- end }}
{{- if .jobSpec }}
- name: job-spec
  configMap:
    name: {{ include "carousel.rayJobName" $root }}-spec
{{- end }}
{{- end }}

{{- define "carousel.rayVolumeMounts" -}}
{{- $root := .root -}}
- name: tmp
  mountPath: /tmp
- name: ray-logs
  mountPath: /tmp/ray
- name: shared-mem
  mountPath: /dev/shm
{{- if eq $root.Values.storage.type "pvc" }}
- name: storage
  mountPath: {{ $root.Values.storage.mountPath }}
{{- end }}
{{- if .jobSpec }}
- name: job-spec
  mountPath: /etc/carousel/job
  readOnly: true
{{- end }}
{{- end }}

{{/*
A Ray pod template. Pass (dict "root" $ "component" "ray-head"|"ray-worker" "group" <group values>
"head" bool "jobSpec" bool).
*/}}
{{- define "carousel.rayPodTemplate" -}}
{{- $root := .root -}}
{{- $g := .group -}}
metadata:
  labels:
    {{- include "carousel.podLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  serviceAccountName: {{ include "carousel.serviceAccountName" $root }}
  {{- /* Only the autoscaler sidecar talks to the Kubernetes API. */}}
  automountServiceAccountToken: {{ and .head $root.Values.ray.autoscaling.enabled }}
  securityContext:
    {{- include "carousel.podSecurityContext" $root | nindent 4 }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .component }}
      image: {{ include "carousel.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      securityContext:
        {{- include "carousel.containerSecurityContext" (list $root $root.Values.ray.readOnlyRootFilesystem) | nindent 8 }}
      {{- $res := deepCopy $g.resources }}
      {{- if and (not .head) (gt (int $g.gpus) 0) }}
      {{- $_ := set $res.limits "nvidia.com/gpu" (int $g.gpus) }}
      {{- $_ := set $res.requests "nvidia.com/gpu" (int $g.gpus) }}
      {{- end }}
      resources:
        {{- toYaml $res | nindent 8 }}
      {{- if .head }}
      ports:
        - name: gcs-server
          containerPort: 6379
        - name: dashboard
          containerPort: 8265
        - name: client
          containerPort: 10001
      {{- end }}
      env:
        {{- include "carousel.rayEnv" $root | nindent 8 }}
      volumeMounts:
        {{- include "carousel.rayVolumeMounts" (dict "root" $root "jobSpec" .jobSpec) | nindent 8 }}
  volumes:
    {{- include "carousel.rayVolumes" (dict "root" $root "sharedMemory" $g.sharedMemory "jobSpec" .jobSpec) | nindent 4 }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* rayStartParams are strings in the CRD, whatever YAML type the user wrote. */}}
{{- define "carousel.rayStartParams" -}}
{{- $params := dict }}
{{- range $k, $v := . }}
{{- $_ := set $params $k (toString $v) }}
{{- end }}
{{- toYaml $params }}
{{- end }}

{{/*
The RayCluster spec, shared by the standing RayCluster and the cluster each RayJob brings up.
Pass (dict "root" $ "jobSpec" bool).
*/}}
{{- define "carousel.rayClusterSpec" -}}
{{- $root := .root -}}
{{- $auto := $root.Values.ray.autoscaling -}}
{{- if semverCompare "<2.52.0" $root.Values.ray.version }}
{{- fail (printf "ray.version %s: Ray token authentication (always on) needs Ray 2.52.0 or newer" $root.Values.ray.version) }}
{{- end -}}
rayVersion: {{ $root.Values.ray.version | quote }}
authOptions:
  mode: token
  secretName: {{ include "carousel.rayAuthSecret" $root }}
enableInTreeAutoscaling: {{ $auto.enabled }}
{{- if $auto.enabled }}
autoscalerOptions:
  idleTimeoutSeconds: {{ $auto.idleTimeoutSeconds }}
  upscalingMode: {{ $auto.upscalingMode }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  resources:
    {{- toYaml $auto.resources | nindent 4 }}
  securityContext:
    {{- include "carousel.containerSecurityContext" (list $root $root.Values.ray.readOnlyRootFilesystem) | nindent 4 }}
  env:
    - name: XDG_CACHE_HOME
      value: /tmp/.cache
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    - name: ray-logs
      mountPath: /tmp/ray
{{- end }}
headGroupSpec:
  serviceType: ClusterIP
  enableIngress: false
  rayStartParams:
    {{- include "carousel.rayStartParams" $root.Values.ray.head.rayStartParams | nindent 4 }}
  template:
    {{- include "carousel.rayPodTemplate" (dict "root" $root "component" "ray-head" "group" $root.Values.ray.head "head" true "jobSpec" .jobSpec) | nindent 4 }}
workerGroupSpecs:
{{- $seen := dict }}
{{- range $g := $root.Values.ray.workerGroups }}
{{- if hasKey $seen $g.name }}
{{- fail (printf "ray.workerGroups: the name %q is used twice; KubeRay tells groups apart by name" $g.name) }}
{{- end }}
{{- $_ := set $seen $g.name true }}
{{- $replicas := int $g.replicas }}
{{- $min := $replicas }}
{{- $max := $replicas }}
{{- if hasKey $g "minReplicas" }}{{ $min = int $g.minReplicas }}{{ end }}
{{- if hasKey $g "maxReplicas" }}{{ $max = int $g.maxReplicas }}{{ end }}
{{- if $auto.enabled }}
{{- if gt $min $max }}
{{- fail (printf "ray.workerGroups[%s]: minReplicas (%d) is greater than maxReplicas (%d)" $g.name $min $max) }}
{{- end }}
{{- if or (lt $replicas $min) (gt $replicas $max) }}
{{- fail (printf "ray.workerGroups[%s]: replicas (%d) must lie between minReplicas (%d) and maxReplicas (%d)" $g.name $replicas $min $max) }}
{{- end }}
{{- else }}
{{- /* Without the autoscaler KubeRay clamps replicas into [min, max]; pin both so the group is exactly `replicas`. */}}
{{- $min = $replicas }}
{{- $max = $replicas }}
{{- end }}
  - groupName: {{ $g.name }}
    replicas: {{ $replicas }}
    minReplicas: {{ $min }}
    maxReplicas: {{ $max }}
    rayStartParams:
      {{- include "carousel.rayStartParams" $g.rayStartParams | nindent 6 }}
    template:
      {{- include "carousel.rayPodTemplate" (dict "root" $root "component" "ray-worker" "group" $g "head" false "jobSpec" false) | nindent 6 }}
{{- end }}
{{- end }}

{{/*
The job spec as YAML text, from exactly one of job.spec, job.specFile, job.specYaml.
Checked here so a typo fails `helm install` instead of a job minutes later.
*/}}
{{- define "carousel.jobSpecYaml" -}}
{{- $job := .Values.job -}}
{{- $sources := 0 -}}
{{- if $job.spec }}{{ $sources = add1 $sources }}{{ end -}}
{{- if $job.specFile }}{{ $sources = add1 $sources }}{{ end -}}
{{- if $job.specYaml }}{{ $sources = add1 $sources }}{{ end -}}
{{- if ne (int $sources) 1 }}
{{- fail "job.enabled needs exactly one of job.spec, job.specFile or job.specYaml" }}
{{- end -}}
{{- $text := "" -}}
{{- if $job.spec }}
{{- $text = toYaml $job.spec }}
{{- else if $job.specFile }}
{{- $text = .Files.Get $job.specFile }}
{{- if not $text }}
{{- fail (printf "job.specFile %q is not a non-empty file inside the chart (e.g. jobs/lm-kjv-small.yaml)" $job.specFile) }}
{{- end }}
{{- else }}
{{- $text = $job.specYaml }}
{{- end -}}
{{- $parsed := fromYaml $text -}}
{{- if hasKey $parsed "Error" }}
{{- fail (printf "the job spec is not valid YAML: %s" (index $parsed "Error")) }}
{{- end }}
{{- if not (index $parsed "name") }}
{{- fail "the job spec has no `name`: Carousel names the run (and finds its checkpoints) by it" }}
{{- end }}
{{- $text | trim }}
{{- end }}
