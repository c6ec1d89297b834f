"""The configured terminology service: the remote server at ``STARVIT_TERMINOLOGY_URL``, or
the embedded local service over the shipped content when it is unset."""

from __future__ import annotations

from starvit_assets.settings import StarvitSettings
from starvit_assets.terminology.cache import ResponseCache
from starvit_assets.terminology.client import ClientConfig, RemoteTerminology
from starvit_assets.terminology.local import LocalTerminology
from starvit_assets.terminology.model import TerminologyService

CACHE_FILE = "terminology-cache.sqlite"


def terminology_service(settings: StarvitSettings) -> TerminologyService:
    if not settings.terminology_url:
        return LocalTerminology()
    cache = ResponseCache(
        settings.state_dir / CACHE_FILE, max_entries=settings.terminology_cache_max_entries
    )
    config = ClientConfig(
        timeout_seconds=settings.terminology_timeout_seconds,
        batch_size=settings.terminology_batch_size,
    )
    return RemoteTerminology(settings.terminology_url, cache=cache, config=config)
