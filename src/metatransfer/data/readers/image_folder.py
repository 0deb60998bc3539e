"""A generic image folder for users' own data: ROOT/{train,val,test}/<class>/<images>."""

from __future__ import annotations

from metatransfer.errors import DataError

from .base import Reader, SplitSpec, class_folders_split, register_reader


@register_reader
class ImageFolderReader(Reader):
    name = "image-folder"
    layout = "ROOT/{train,val,test}/<class>/*.{jpg,jpeg,png,bmp,webp} (your own data; any subset of splits)"
    default_size = 84
    channels = 3

    def splits(self) -> list[str]:
        return [s for s in self.expected_splits if (self.root / s).is_dir()]

    def split(self, name: str) -> SplitSpec:
        self._check_split_name(name)
        split_dir = self.root / name
        if not split_dir.is_dir():
            raise DataError(f"image-folder split '{name}' is not present: no {split_dir} folder")
        return class_folders_split(split_dir, name, 3)
