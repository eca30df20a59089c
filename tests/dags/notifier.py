"""A notifier for tests: writes the alert to a file, as a Slack or SMTP notifier would send it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from airflow.sdk import BaseNotifier


class FileNotifier(BaseNotifier):
    """Append ``text`` to ``path``."""

    template_fields = ("text",)

    def __init__(self, *, path: str, text: str) -> None:
        super().__init__()
        self.path = path
        self.text = text

    def notify(self, context: Any) -> None:
        with Path(self.path).open("a", encoding="utf-8") as file:
            file.write(self.text + "\\n")
