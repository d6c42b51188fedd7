import time

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


def test_a_worker_waits_for_the_run_its_launch_records(tmp_path):
    """Rank 0 gets the MLflow run id of *this* launch: an older record of the same run (a resume)
    does not answer, the record the driver writes later does; a driver that never writes it ends
    the wait with an error naming the run and where its record should be."""
    import threading

    import pytest

    from carousel.tracking.runs import RunNotOpened, wait_for_mlflow_run

    storage = str(tmp_path)
    RunRecord("r", "old-run", "0", "sqlite://", {}, status="FAILED", launch="earlier").save(storage)

    def driver_opens_it():
        time.sleep(0.5)
        RunRecord("r", "old-run", "0", "sqlite://", {}, status="RUNNING", launch="now").save(storage)

    t0 = time.time()
    threading.Thread(target=driver_opens_it).start()
    assert wait_for_mlflow_run(storage, "r", "now", timeout=10, pause=0.05) == "old-run"
    assert 0.4 < time.time() - t0 < 5
    with pytest.raises(RunNotOpened, match=r"run r: .*carousel-run.json within 0 s"):
        wait_for_mlflow_run(storage, "r", "another", timeout=0.3, pause=0.05)
    with pytest.raises(RunNotOpened):
        wait_for_mlflow_run(storage, "missing", "now", timeout=0.2, pause=0.05)

