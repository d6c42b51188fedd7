"""Datasets on an object store: `carousel prepare` writes to s3://, training-side readers verify and read.

The S3 API is moto's server on 127.0.0.1 — a real HTTP S3 endpoint, reached through pyarrow's own
S3 filesystem exactly as AWS would be.
"""

import subprocess
import time
import urllib.request

import pytest

from carousel.data.shards import DataError, Dataset
from carousel.data.storage import Location
from carousel.data.streams import StreamLoader
from conftest import BIN, free_port, run

pytestmark = pytest.mark.integration


@pytest.fixture
def s3(monkeypatch):
    port = free_port()
    server = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in creds.items():
        monkeypatch.setenv(k, v)
    base = f"s3://corpora/kjv?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    Location.parse(base + "&allow_bucket_creation=true").fs.create_dir("corpora")
    yield base, creds
    server.terminate()
    server.wait(10)


def test_prepare_to_s3_then_verify_and_stream(s3, tmp_path, cluster_env):
    base, creds = s3
    text = tmp_path / "psalm.txt"
    text.write_text("\n".join(f"Praise ye the LORD, verse {i}. O give thanks unto the LORD." for i in range(400)))
    run([BIN / "carousel", "prepare", "text", "--input", text, "--out", base, "--tokenizer", "char",
         "--vocab-size", "100", "--shard-lines", "100"], env={**cluster_env, **creds})

    ds = Dataset(base)
    report = ds.verify()
    assert report["train"]["shards"] == 4 and report["train"]["rows"] == 360
    loader = StreamLoader(ds, "train", 1, 2, 4, 16)
    x, y, fresh = loader.next()
    assert fresh and x.shape == (4, 16) and (x[:, 1:] == y[:, :-1]).all()

    # A shard replaced behind the manifest's back is refused, by name, on the object store too.
    shard = Location.parse(base).join("train-00002.arrow")
    with shard.fs.open_output_stream(shard.path) as f:
        f.write(b"not arrow")
    with pytest.raises(DataError, match="train-00002.arrow"):
        Dataset(base).verify()
