"""The ``twistd storage-proxy`` plugin: names ``storage.tap`` and nothing more."""

from twisted.application.service import ServiceMaker

storage_proxy = ServiceMaker(
    "Backend.AI storage proxy",
    "storage.tap",
    "A Backend.AI storage proxy: vfolder management, tus uploads and downloads.",
    "storage-proxy",
)
