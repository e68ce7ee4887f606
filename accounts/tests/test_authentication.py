"""API keys: the secret shown once, only its digest stored, Bearer authentication, last use."""

import hashlib
import re
import time
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test import RequestFactory

from accounts.authentication import ApiKeyAuth
from accounts.models import APIKey
from accounts.services import api_key_authenticate, api_key_revoke
from accounts.tests.factories import make_api_key, make_organisation

NOW = datetime(2026, 11, 23, 12, tzinfo=UTC)


def every_stored_value():
    """Yield every value of every column of every table, as text."""
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names():
            cursor.execute(f"SELECT * FROM {connection.ops.quote_name(table)}")  # noqa: S608
            for row in cursor.fetchall():
                yield from (str(value) for value in row if value is not None)


def stored_last_used(issued):
    return APIKey.objects.values_list("last_used_at", flat=True).get(pk=issued.api_key.pk)


# --- Issuing -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_new_key_shows_its_secret_once_and_stores_only_its_digest():
    issued = make_api_key(make_organisation(), name="CI")

    stored = APIKey.objects.get(pk=issued.api_key.pk)

    assert re.fullmatch(r"ml_[0-9a-f]{8}", stored.prefix)
    assert issued.secret.startswith(f"{stored.prefix}_")
    assert len(issued.secret) > len(stored.prefix) + 40  # 32 random bytes after the prefix
    assert stored.digest == hashlib.sha256(issued.secret.encode()).hexdigest()
    assert not hasattr(stored, "secret")
    values = list(every_stored_value())
    assert stored.digest in values  # the scan does see the keys table
    assert not any(issued.secret in value for value in values)
    assert str(stored) == f"{stored.prefix}… (CI)"


@pytest.mark.django_db
def test_every_key_is_different():
    organisation = make_organisation()

    first, second = make_api_key(organisation), make_api_key(organisation)

    assert first.secret != second.secret
    assert first.api_key.prefix != second.api_key.prefix
    assert first.api_key.digest != second.api_key.digest


# --- Authenticating --------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_key_authenticates_as_itself_with_its_organisation(django_assert_num_queries):
    organisation = make_organisation()
    issued = make_api_key(organisation)
    make_api_key(organisation)

    api_key = api_key_authenticate(secret=issued.secret, now=NOW)

    assert api_key == issued.api_key
    with django_assert_num_queries(0):
        assert api_key.organisation == organisation


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("make_secret", "queries"),
    [
        pytest.param(lambda s: s[:-1] + ("A" if s[-1] != "A" else "B"), 1, id="altered"),
        pytest.param(lambda s: s[:-1], 1, id="truncated"),
        # Refused before the database: not shaped like a key.
        pytest.param(lambda s: s.removeprefix("ml_"), 0, id="without-prefix"),
        pytest.param(lambda s: s.upper(), 0, id="upper-case"),
        pytest.param(lambda s: s + "x" * 200, 0, id="over-200-characters"),
        pytest.param(lambda s: "", 0, id="empty"),
        pytest.param(lambda s: hashlib.sha256(s.encode()).hexdigest(), 0, id="the-digest"),
    ],
)
def test_anything_but_the_exact_secret_is_refused(django_assert_num_queries, make_secret, queries):
    issued = make_api_key()

    with django_assert_num_queries(queries):
        api_key = api_key_authenticate(secret=make_secret(issued.secret), now=NOW)

    assert api_key is None
    assert stored_last_used(issued) is None


@pytest.mark.django_db
def test_a_revoked_key_is_refused_and_revoking_again_keeps_the_first_time():
    issued = make_api_key()

    api_key_revoke(api_key=issued.api_key, at=NOW)
    api_key_revoke(api_key=issued.api_key, at=NOW + timedelta(days=1))

    assert api_key_authenticate(secret=issued.secret, now=NOW + timedelta(days=2)) is None
    assert APIKey.objects.get(pk=issued.api_key.pk).revoked_at == NOW


@pytest.mark.django_db
def test_revoking_one_key_leaves_the_others_working():
    organisation = make_organisation()
    revoked, kept = make_api_key(organisation), make_api_key(organisation)

    api_key_revoke(api_key=revoked.api_key, at=NOW)

    assert api_key_authenticate(secret=kept.secret, now=NOW) == kept.api_key


# --- last_used_at --------------------------------------------------------------------------


@pytest.mark.django_db
def test_first_use_writes_last_used_at(django_assert_num_queries):
    issued = make_api_key()

    with django_assert_num_queries(2):  # the lookup, then the conditional update
        api_key = api_key_authenticate(secret=issued.secret, now=NOW)

    assert api_key.last_used_at == NOW
    assert stored_last_used(issued) == NOW


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("later", "written"),
    [
        pytest.param(timedelta(seconds=1), False, id="a-second-later"),
        pytest.param(timedelta(seconds=60), False, id="exactly-the-interval-later"),
        pytest.param(timedelta(seconds=60, microseconds=1), True, id="just-past-the-interval"),
        pytest.param(timedelta(hours=5), True, id="hours-later"),
    ],
)
def test_last_used_at_is_rewritten_only_once_the_interval_has_passed(
    settings, django_assert_num_queries, later, written
):
    settings.API_KEY_LAST_USED_INTERVAL = timedelta(seconds=60)
    settings.API_KEY_CACHE_SECONDS = 0  # the database path itself
    issued = make_api_key()
    api_key_authenticate(secret=issued.secret, now=NOW)

    with django_assert_num_queries(2 if written else 1):
        api_key = api_key_authenticate(secret=issued.secret, now=NOW + later)

    expected = NOW + later if written else NOW
    assert api_key.last_used_at == expected
    assert stored_last_used(issued) == expected


@pytest.mark.django_db
def test_a_concurrent_stamp_is_not_overwritten(settings):
    """Another request stamps the key between our read and our write: ours writes nothing."""
    settings.API_KEY_LAST_USED_INTERVAL = timedelta(seconds=60)
    settings.API_KEY_CACHE_SECONDS = 0  # the database path itself
    issued = make_api_key()
    api_key_authenticate(secret=issued.secret, now=NOW)
    concurrent_stamp = NOW + timedelta(seconds=61)
    stamped = []

    def stamp_after_the_read(execute, sql, params, many, context):
        result = execute(sql, params, many, context)
        if not stamped and sql.lstrip().upper().startswith("SELECT"):
            stamped.append(sql)
            APIKey.objects.filter(pk=issued.api_key.pk).update(last_used_at=concurrent_stamp)
        return result

    with connection.execute_wrapper(stamp_after_the_read):
        api_key_authenticate(secret=issued.secret, now=NOW + timedelta(seconds=62))

    assert stamped
    assert stored_last_used(issued) == concurrent_stamp


@pytest.mark.django_db
def test_a_request_made_with_the_key_stamps_last_used_at(client):
    issued = make_api_key()

    response = client.get("/api/v1/meters", headers={"Authorization": f"Bearer {issued.secret}"})

    assert response.status_code == 200
    assert stored_last_used(issued) is not None


# --- The Bearer header ---------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("header", "authenticated"),
    [
        pytest.param("Bearer {secret}", True, id="bearer"),
        pytest.param("bearer {secret}", True, id="scheme-lower-case"),
        pytest.param("BEARER {secret}", True, id="scheme-upper-case"),
        pytest.param("Bearer  {secret} ", True, id="extra-spaces"),
        pytest.param("Basic {secret}", False, id="basic-scheme"),
        pytest.param("Token {secret}", False, id="token-scheme"),
        pytest.param("{secret}", False, id="no-scheme"),
        pytest.param("Bearer", False, id="no-token"),
        pytest.param("Bearer ", False, id="blank-token"),
        pytest.param(None, False, id="no-header"),
    ],
)
def test_the_authorization_header_must_carry_a_bearer_key(header, authenticated):
    issued = make_api_key()
    headers = {} if header is None else {"Authorization": header.format(secret=issued.secret)}
    request = RequestFactory().get("/api/v1/meters", headers=headers)

    api_key = ApiKeyAuth()(request)

    assert api_key == (issued.api_key if authenticated else None)


@pytest.mark.django_db
def test_a_verified_key_is_remembered_briefly_and_revocation_reaches_every_process(
    settings, django_assert_num_queries, monkeypatch
):
    settings.API_KEY_CACHE_SECONDS = 5
    issued = make_api_key()
    assert api_key_authenticate(secret=issued.secret, now=NOW) is not None
    with django_assert_num_queries(0):
        assert api_key_authenticate(secret=issued.secret, now=NOW) is not None

    # Revoked by another process (a direct update): this one notices once its copy is 5 s old.
    APIKey.objects.filter(pk=issued.api_key.pk).update(revoked_at=NOW)
    clock = time.monotonic()
    monkeypatch.setattr("accounts.services.time.monotonic", lambda: clock + 5.01)
    assert api_key_authenticate(secret=issued.secret, now=NOW) is None


@pytest.mark.django_db
def test_revoking_in_this_process_takes_effect_at_once(settings):
    settings.API_KEY_CACHE_SECONDS = 60
    issued = make_api_key()
    assert api_key_authenticate(secret=issued.secret) is not None
    api_key_revoke(api_key=issued.api_key)
    assert api_key_authenticate(secret=issued.secret) is None
