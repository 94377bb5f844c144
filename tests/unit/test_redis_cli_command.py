"""The redis-cli commands that error messages print for the user to run."""

from __future__ import annotations

import shlex

import pytest

from etl.config import load_settings
from etl.sink import redis_cli_command


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param(
            "redis://127.0.0.1:6380/5",
            "redis-cli -h 127.0.0.1 -p 6380 -n 5",
            id="database-in-path",
        ),
        pytest.param("redis://cache/0?db=3", "redis-cli -h cache -n 3", id="db-query"),
        pytest.param("redis://cache", "redis-cli -h cache -n 0", id="no-database"),
        pytest.param(
            "redis://[::1]:6380/2", "redis-cli -h ::1 -p 6380 -n 2", id="ipv6"
        ),
        pytest.param(
            "unix:///run/redis.sock?db=2",
            "redis-cli -s /run/redis.sock -n 2",
            id="unix-socket",
        ),
        pytest.param(
            "redis://:hunter2@cache:6380/1",
            "redis-cli -h cache -p 6380 --askpass -n 1",
            id="password",
        ),
        pytest.param(
            "rediss://etl:hunter2@cache:6380/4?ssl_ca_certs=/etc/ca.pem",
            "redis-cli -h cache -p 6380 --tls --cacert /etc/ca.pem --user etl "
            "--askpass -n 4",
            id="tls-and-user",
        ),
        pytest.param(
            "rediss://cache/0?ssl_cert_reqs=none",
            "redis-cli -h cache --tls --insecure -n 0",
            id="tls-unverified",
        ),
        pytest.param(
            "redis://cache/0?password=hunter2",
            "redis-cli -h cache --askpass -n 0",
            id="query-password",
        ),
    ],
)
def test_redis_cli_command_names_server(url: str, expected: str) -> None:
    settings = load_settings(redis_url=url)

    command = redis_cli_command(settings, "HDEL", "offsets", "vitals:0")

    assert command == f"{expected} HDEL offsets vitals:0"
    assert "hunter2" not in command


def test_redis_cli_command_quotes_arguments() -> None:
    """Key names may contain spaces or shell characters, and each stays one argument."""
    settings = load_settings(redis_url="redis://cache:6380/5")

    command = redis_cli_command(settings, "HDEL", "ward 7:offsets", "$topic;:0")

    assert shlex.split(command)[-3:] == ["HDEL", "ward 7:offsets", "$topic;:0"]
