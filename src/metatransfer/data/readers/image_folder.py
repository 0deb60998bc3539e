"""A generic image folder for users' own data: ROOT/{train,val,test}/<class>/<images>."""

from __future__ import annotations

from .base import SplitFoldersReader, register_reader


@register_reader
class ImageFolderReader(SplitFoldersReader):
    name = "image-folder"
    layout = "ROOT/{train,val,test}/<class>/*.{jpg,jpeg,png,bmp,webp} (your own data; any subset of splits)"
    default_size = 84
    channels = 3
