"""The AMP commands between the proxy and its privileged XFS helper.

Arguments are typed by AMP; the helper still validates every value (see
``validate``).  Errors are declared per command so the proxy gets a typed
exception, never a bare "unhandled error".
"""

from __future__ import annotations

from twisted.protocols import amp


class HelperError(Exception):
    """Base of the errors the helper reports."""


class InvalidArgument(HelperError):
    pass


class ProjectNotFound(HelperError):
    pass


class ProjectConflict(HelperError):
    pass


class CommandFailed(HelperError):
    """``xfs_quota`` failed; the message holds its argv and stderr."""


class RegistryFailed(HelperError):
    """Reading or writing /etc/projects, /etc/projid or the limits file failed."""


_ERRORS: dict[type[Exception], bytes] = {
    InvalidArgument: b"INVALID_ARGUMENT",
    CommandFailed: b"COMMAND_FAILED",
    RegistryFailed: b"REGISTRY_FAILED",
}


class Ping(amp.Command):
    arguments = []  # type: ignore[var-annotated]
    response = [(b"version", amp.Integer())]


class CreateProject(amp.Command):
    """Register ``name`` for ``path``, mark the tree, set the limit.  Idempotent."""

    arguments = [(b"name", amp.Unicode()), (b"path", amp.Unicode()), (b"limit_bytes", amp.Integer())]
    response = [(b"project_id", amp.Integer())]
    errors = {**_ERRORS, ProjectConflict: b"PROJECT_CONFLICT"}


class SetLimit(amp.Command):
    """Hard (and soft) block limit of a registered project; 0 removes it."""

    arguments = [(b"name", amp.Unicode()), (b"limit_bytes", amp.Integer())]
    response = [(b"project_id", amp.Integer())]
    errors = {**_ERRORS, ProjectNotFound: b"PROJECT_NOT_FOUND"}


class Report(amp.Command):
    arguments = [(b"name", amp.Unicode())]
    response = [
        (b"project_id", amp.Integer()),
        (b"used_bytes", amp.Integer()),
        (b"soft_limit_bytes", amp.Integer()),
        (b"hard_limit_bytes", amp.Integer()),
        (b"inodes_used", amp.Integer()),
        (b"inode_soft_limit", amp.Integer()),
        (b"inode_hard_limit", amp.Integer()),
    ]
    errors = {**_ERRORS, ProjectNotFound: b"PROJECT_NOT_FOUND"}


class RemoveProject(amp.Command):
    """Clear the limit and drop the registry entries (the directory stays)."""

    arguments = [(b"name", amp.Unicode())]
    response = [(b"project_id", amp.Integer())]
    errors = {**_ERRORS, ProjectNotFound: b"PROJECT_NOT_FOUND"}


PROTOCOL_VERSION = 1
