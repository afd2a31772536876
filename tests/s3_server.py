"""An S3 API on 127.0.0.1 for tests: moto's server with one empty bucket.

pyarrow, and with it Ray Tune and search.storage.RemotePath, reach it through the standard
AWS environment variables that `s3_environment` returns.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

from packaging.version import Version

BUCKET = "groupim-test"
# pyarrow 25 rejects moto 5.2.1's reply to CompleteMultipartUpload, so uploads fail there;
# 5.2.6 is the version these tests ran with.
MOTO_TESTED = Version("5.2.6")


def moto_problem() -> str | None:
    """Return why the S3 server cannot run here, or None when it can."""
    try:
        import moto
        from moto.server import ThreadedMotoServer  # noqa: F401
    except ImportError as err:
        return f"moto[server] is not installed ({err})"
    if Version(moto.__version__) < MOTO_TESTED:
        return f"moto {moto.__version__} is older than {MOTO_TESTED}, which these tests need"
    return None


@contextlib.contextmanager
def s3_environment() -> Iterator[dict[str, str]]:
    """Run an S3 server with the bucket BUCKET and yield the environment variables that reach it.

    AWS_EC2_METADATA_DISABLED keeps the AWS SDKs from asking the instance metadata service
    for credentials.
    """
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    try:
        client = boto3.client(
            "s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
            aws_access_key_id="test", aws_secret_access_key="test",
        )
        client.create_bucket(Bucket=BUCKET)
        yield env
    finally:
        server.stop()
