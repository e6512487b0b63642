"""A local S3 (moto's server) for the tests that read and write ``s3://`` (tests only)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest


@contextlib.contextmanager
def moto_s3(bucket: str, *, endpoint_env: bool = False) -> Iterator[str]:
    """A moto S3 server on a free port holding an empty ``bucket``; yields its URL.

    The AWS test credentials are set while it runs (and ``AWS_ENDPOINT_URL_S3``, with
    ``endpoint_env``, for code that finds the endpoint there); the environment is restored after.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    if endpoint_env:
        env["AWS_ENDPOINT_URL_S3"] = url
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            import boto3

            boto3.client("s3", endpoint_url=url).create_bucket(Bucket=bucket)
            yield url
    finally:
        server.stop()
