"""How long a tracking server may hold Carousel, and what it says when one refuses: pure rules, no server."""

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INTERNAL_ERROR, INVALID_PARAMETER_VALUE, PERMISSION_DENIED, REQUEST_LIMIT_EXCEEDED, RESOURCE_DOES_NOT_EXIST,
    TEMPORARILY_UNAVAILABLE, UNAUTHENTICATED,
)

from carousel.tracking import store
from carousel.tracking.store import worth_retrying


def test_http_bounds_apply_only_where_the_user_chose_nothing():
    env = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
    assert store.bound_http_requests(env) == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
    assert env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"


def test_workers_get_the_same_bounds_as_the_driver(monkeypatch):
    from carousel.ray_session import worker_env

    for k in store.HTTP_BOUNDS:
        monkeypatch.delenv(k, raising=False)
    assert {k: worker_env()[k] for k in store.HTTP_BOUNDS} == store.HTTP_BOUNDS


@pytest.mark.parametrize("code,retry", [
    (INTERNAL_ERROR, True),            # connection refused / timed out / 500 all arrive as this
    (TEMPORARILY_UNAVAILABLE, True),   # 503
    (REQUEST_LIMIT_EXCEEDED, True),    # 429
    (UNAUTHENTICATED, True),           # 401: keep the points while the login is fixed
    (PERMISSION_DENIED, True),         # 403
    (INVALID_PARAMETER_VALUE, False),  # 400: the same batch fails the same way forever
    (RESOURCE_DOES_NOT_EXIST, False),  # 404: the run is gone
])
def test_which_failed_sends_are_worth_retrying(code, retry):
    assert worth_retrying(MlflowException("x", error_code=code)) is retry


def test_anything_else_that_fails_a_send_is_retried():
    assert worth_retrying(ConnectionError("reset")) and worth_retrying(OSError("no route"))


def test_refusals_name_the_server_the_user_and_the_variables():
    uri = "http://127.0.0.1:5000"
    anon = store.describe_refusal(uri, 401, None)
    assert uri in anon and "requires a login and none was given" in anon and "MLFLOW_TRACKING_USERNAME" in anon
    wrong = store.describe_refusal(uri, 401, "admin")
    assert "refused the login of user 'admin'" in wrong and "MLFLOW_TRACKING_PASSWORD" in wrong
    assert "HTTP 403" in store.describe_refusal(uri, 403, "bob")
    assert "HTTP 502: bad gateway" in store.describe_refusal(uri, 502, None, "bad gateway")


def test_only_servers_are_checked_before_a_run():
    assert store.is_server_uri("https://mlflow.example.com") and store.is_server_uri("http://127.0.0.1:5000")
    assert not store.is_server_uri("sqlite:////tmp/mlflow.db") and not store.is_server_uri("postgresql://u@db/m")
    store.require_tracking_server("sqlite:////nonexistent/dir/mlflow.db")  # a file store: nothing to reach


def test_final_status_is_retried_while_the_server_is_away_and_gives_up_in_time():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise MlflowException("Connection refused", error_code=INTERNAL_ERROR)
        return "done"

    assert store.retry_while_unreachable(flaky, "http://x", "mark it", timeout=5, pause=0) == "done" and len(calls) == 3

    def refused():
        raise MlflowException("bad", error_code=INVALID_PARAMETER_VALUE)

    with pytest.raises(MlflowException, match="bad"):  # not worth waiting for
        store.retry_while_unreachable(refused, "http://x", "mark it", timeout=5, pause=0)

    def gone():
        raise MlflowException("... [Errno 111] Connection refused", error_code=INTERNAL_ERROR)

    with pytest.raises(store.TrackingUnavailable, match=r"http://x stayed unreachable for 0 s: could not mark it "
                                                        r"\(Connection refused\)"):
        store.retry_while_unreachable(gone, "http://x", "mark it", timeout=0.2, pause=0.05)


def test_server_auth_reads_what_mlflows_client_reads_in_its_order(tmp_path):
    """The start-up check authenticates as MLflow's client would (mlflow.utils.credentials):
    environment before ~/.mlflow/credentials, basic auth before a token, MLflow's TLS settings;
    auth that only MLflow can do is left to MLflow."""
    from carousel.tracking.store import server_auth

    creds = tmp_path / "credentials"
    creds.write_text("[mlflow]\nmlflow_tracking_username = fileuser\nmlflow_tracking_password = filepw\n")
    assert server_auth({}, str(creds))["auth"] == ("fileuser", "filepw")
    env = {"MLFLOW_TRACKING_USERNAME": "envuser", "MLFLOW_TRACKING_PASSWORD": "envpw", "MLFLOW_TRACKING_TOKEN": "t"}
    got = server_auth(env, str(creds))
    assert got["auth"] == ("envuser", "envpw") and got["headers"] == {} and got["user"] == "envuser"
    got = server_auth({"MLFLOW_TRACKING_TOKEN": "t"}, str(tmp_path / "none"))
    assert got["auth"] is None and got["headers"] == {"Authorization": "Bearer t"} and got["user"] is None
    assert server_auth({}, str(tmp_path / "none"))["verify"] is True
    assert server_auth({"MLFLOW_TRACKING_INSECURE_TLS": "TRUE"}, str(creds))["verify"] is False
    tls = server_auth({"MLFLOW_TRACKING_SERVER_CERT_PATH": "/ca.pem", "MLFLOW_TRACKING_CLIENT_CERT_PATH": "/me.pem"}, str(creds))
    assert tls["verify"] == "/ca.pem" and tls["cert"] == "/me.pem"
    assert server_auth({"MLFLOW_TRACKING_AWS_SIGV4": "true"}, str(creds)) is None
    assert server_auth({"MLFLOW_TRACKING_AUTH": "my_plugin"}, str(creds)) is None


def test_a_refused_tracking_server_fails_the_check_naming_it():
    import socket

    import pytest

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(store.TrackingUnavailable, match=rf"server at {uri} is not reachable \(Connection refused\).*Nothing was started"):
        store.require_tracking_server(uri, timeout=2, retries=0)
