"""Which organisation a portal request acts for: one the user is a member of, kept in the
session. Objects of any other organisation answer 404, never 403."""

from __future__ import annotations

from django.http import Http404, HttpRequest
from django.utils import timezone

from accounts.models import Membership, Organisation

SESSION_KEY = "portal_organisation_id"


def _user_id(request: HttpRequest) -> int:
    # Portal views require a login; an anonymous request has no organisation at all.
    if request.user.pk is None:
        raise Http404("Log in first.")
    return int(request.user.pk)


def organisations_of(request: HttpRequest) -> list[Organisation]:
    return [
        membership.organisation
        for membership in Membership.objects.filter(user_id=_user_id(request))
        .select_related("organisation")
        .order_by("organisation__name")
    ]


def current_organisation(request: HttpRequest) -> Organisation:
    """The organisation chosen in the session, or the user's first; 404 if they have none."""
    chosen = request.session.get(SESSION_KEY)
    memberships = Membership.objects.filter(user_id=_user_id(request)).select_related(
        "organisation"
    )
    membership = (
        memberships.filter(organisation_id=chosen).first() if chosen is not None else None
    ) or memberships.order_by("organisation__name").first()
    if membership is None:
        raise Http404("You are not a member of any organisation.")
    if chosen != membership.organisation_id:
        # Written only when it changes: a polled page must not rewrite the session each time.
        request.session[SESSION_KEY] = membership.organisation_id
    # Dates on the portal's pages are the organisation's local dates.
    timezone.activate(membership.organisation.tzinfo)
    return membership.organisation


def organisation_switch(request: HttpRequest, organisation_id: int) -> Organisation:
    membership = (
        Membership.objects.filter(user_id=_user_id(request), organisation_id=organisation_id)
        .select_related("organisation")
        .first()
    )
    if membership is None:
        raise Http404("No such organisation.")
    request.session[SESSION_KEY] = organisation_id
    return membership.organisation
