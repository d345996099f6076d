"""Virtual folder and quota scope identifiers, in upstream's textual forms.

* quota scope: ``user:<uuid>`` or ``project:<uuid>``
* vfolder: ``<scope>:<quota-scope-uuid>/<folder-uuid-hex>``, or a bare folder
  UUID (the 22.03 form, which has no quota scope).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import PurePosixPath

QUOTA_SCOPE_TYPES = ("user", "project")


class InvalidID(ValueError):
    pass


# 32 hex digits, hyphenated or not.  uuid.UUID() alone also takes braces,
# "urn:uuid:", hyphens anywhere, underscores and surrounding blanks (int()'s
# rules): none of that is an id the manager sends, and ids name directories.
UUID_PATTERN = "[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
_UUID_TEXT = re.compile(UUID_PATTERN)


def _parse_uuid(text: str, what: str) -> uuid.UUID:
    if not isinstance(text, str) or not _UUID_TEXT.fullmatch(text):
        raise InvalidID(f"{what} is not a UUID: {text!r}"[:300])
    return uuid.UUID(text)


@dataclass(frozen=True, order=True)
class QuotaScopeID:
    scope_type: str
    scope_id: uuid.UUID

    @classmethod
    def parse(cls, text: object) -> QuotaScopeID:
        if not isinstance(text, str):
            raise InvalidID(f"expected a string like 'user:<uuid>', got {text!r}")
        scope_type, sep, rest = text.partition(":")
        if not sep or scope_type not in QUOTA_SCOPE_TYPES:
            raise InvalidID(f"expected 'user:<uuid>' or 'project:<uuid>', got {text!r}")
        return cls(scope_type, _parse_uuid(rest, "quota scope id"))

    @property
    def pathname(self) -> str:
        """The directory name under the volume root."""
        return self.scope_id.hex

    def __str__(self) -> str:
        return f"{self.scope_type}:{self.scope_id}"


@dataclass(frozen=True, order=True)
class VFolderID:
    quota_scope_id: QuotaScopeID | None
    folder_id: uuid.UUID

    @classmethod
    def parse(cls, text: object) -> VFolderID:
        if not isinstance(text, str):
            raise InvalidID(f"expected a vfolder id string, got {text!r}")
        if "/" in text:
            qs, _, folder = text.partition("/")
            return cls(QuotaScopeID.parse(qs), _parse_uuid(folder, "vfolder id"))
        return cls(None, _parse_uuid(text, "vfolder id"))

    def relative_path(self) -> PurePosixPath:
        """Where the vfolder lives relative to the volume root (upstream's layout)."""
        h = self.folder_id.hex
        tail = PurePosixPath(h[0:2], h[2:4], h[4:])
        if self.quota_scope_id is None:
            return tail
        return PurePosixPath(self.quota_scope_id.pathname) / tail

    def __str__(self) -> str:
        if self.quota_scope_id is None:
            return str(self.folder_id)
        return f"{self.quota_scope_id}/{self.folder_id.hex}"
