"""The schema tests use for dj-stripe is its real schema, and its real migrations apply."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.django_db
def test_the_test_schema_of_djstripe_matches_its_models():
    # Tests build dj-stripe's tables from stripe_sync/tests/djstripe_schema (seconds) instead of
    # its real migrations (about two minutes here). After a dj-stripe upgrade this fails until the schema is
    # regenerated: DJANGO_SETTINGS_MODULE=billing_site.test_settings manage.py makemigrations
    # djstripe (after deleting the old file).
    call_command("makemigrations", "djstripe", "--check", "--dry-run", verbosity=0)


@pytest.mark.postgres  # about two minutes: only in CI's second pass, not in every run
def test_the_real_migrations_apply_on_a_fresh_database(tmp_path):
    environment = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'fresh.sqlite3'}",
        "DJANGO_SETTINGS_MODULE": "billing_site.settings",
    }
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=ROOT,
        env=environment,
        check=True,
        timeout=600,
    )
    subprocess.run(
        [sys.executable, "manage.py", "makemigrations", "--check", "--dry-run"],
        cwd=ROOT,
        env=environment,
        check=True,
        timeout=120,
    )
