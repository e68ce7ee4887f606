"""The settings as a fresh process reads them from the environment."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings

ROOT = Path(__file__).resolve().parents[2]
SECRET = "k3V9-production-like-secret-with-enough-length-and-variety-0193847561"


def manage(*args, **env):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_production_refuses_to_start_without_a_secret_key():
    result = manage("check", DJANGO_DEBUG="false")
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY must be set" in result.stderr


def test_production_settings_pass_the_deploy_check():
    result = manage(
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        DJANGO_DEBUG="false",
        DJANGO_SECRET_KEY=SECRET,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_models_and_migrations_agree():
    result = manage("makemigrations", "--check", "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_embedded_default_is_sqlite_and_the_orm_broker():
    environment = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    code = (
        "import django, os; os.environ['DJANGO_SETTINGS_MODULE']='billing_site.settings'; "
        "from django.conf import settings as s; "
        "print(s.DATABASES['default']['ENGINE'], s.Q_CLUSTER.get('orm'), s.DEBUG, s.EMAIL_BACKEND)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split() == [
        "django.db.backends.sqlite3",
        "default",
        "True",
        "django.core.mail.backends.console.EmailBackend",
    ]


@pytest.mark.redis
def test_tasks_travel_through_the_redis_broker():
    """With REDIS_URL set, django-q2 queues on Redis: a task put there can be taken off again."""
    from django_q.brokers import get_broker
    from django_q.signing import SignedPackage

    assert settings.Q_CLUSTER["redis"] == settings.REDIS_URL
    broker = get_broker(list_key="meterline-test-queue")
    assert broker.ping()
    broker.purge_queue()
    broker.enqueue(SignedPackage.dumps({"id": "t1", "func": "math.floor", "args": (2.5,)}))
    [(task_id, package)] = [broker.dequeue()[0]]
    assert SignedPackage.loads(package)["func"] == "math.floor"
    broker.acknowledge(task_id)
    assert broker.queue_size() == 0
