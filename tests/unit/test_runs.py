from carousel.tracking.runs import RunRecord, free_name


def test_finished_runs_are_never_reopened_by_accident(tmp_path):
    storage = str(tmp_path)
    assert free_name(storage, "job") == "job"
    RunRecord("job", "r1", "1", "sqlite://", {}, status="FINISHED").save(storage)
    assert free_name(storage, "job") == "job-2"
    RunRecord("job-2", "r2", "1", "sqlite://", {}, status="KILLED").save(storage)
    assert free_name(storage, "job") == "job-2"  # unfinished: resume it
    rec = RunRecord.load(storage, "job-2")
    assert rec.mlflow_run_id == "r2" and rec.status == "KILLED"
