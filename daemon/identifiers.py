"""The shapes of names the daemon accepts from anyone (agents, the HTTP API, its own records):
host ids and labels. One definition, so the agent port, the API and the stored queries agree."""

from __future__ import annotations

import re

HOST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,253}$")
LABEL_KEY = re.compile(r"^[A-Za-z0-9._/-]{1,63}$")
MAX_LABELS = 64
MAX_LABEL_VALUE = 255
