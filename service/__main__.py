"""`python -m service`: serve the gateway with uvicorn on SELPRUNE_HOST:SELPRUNE_PORT."""

from __future__ import annotations

import logging
import sys

import uvicorn
from pydantic import ValidationError

from service.auth import is_loopback
from service.main import create_app
from service.settings import get_settings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = get_settings()
    except ValidationError as e:
        sys.exit(f"selprune gateway: invalid settings (SELPRUNE_* environment):\n{e}")
    if not settings.auth_enabled and not is_loopback(settings.host):
        sys.exit(
            f"selprune gateway: refusing to listen on {settings.host!r} without authentication; "
            "set SELPRUNE_API_KEYS or bind a loopback address (SELPRUNE_HOST=127.0.0.1)"
        )
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port)


if __name__ == "__main__":
    main()
