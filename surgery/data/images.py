"""Image files in, tensors out: the one reader, batcher and list of unreadable-image errors that
`predict`, `evaluate`, `explain` and the training data share.

    find_images(paths)                    files given, and image files under folders given
    images_or_skips(paths, err, ...)      the same for a command: missing paths said, none left an error
    decode(open_image, transform)         an image decoded now (a truncated file fails here), transformed
    batches(items, read, size, on_skip)   readable items stacked into batches, unreadable ones skipped
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence, TypeVar

from PIL import Image

from ..errors import Origin, UsageError, describe_exception
from ..files import not_regular, open_regular

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)
# what PIL raises for a file that is not an image it can decode: truncated, corrupt, a bomb, not a picture
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

T = TypeVar("T")


def decode(image: Path | Callable[[], Image.Image], transform: Callable[[Image.Image], Any]) -> Any:
    """`transform` of an image file (or of what `image()` returns), decoded in full first: a
    truncated file fails here, where it can be named, not halfway through a batch.

    Raises:
        One of `UNREADABLE`.
    """
    if callable(image):
        picture = image()
        picture.load()
        return transform(picture)
    with open_regular(image) as f, Image.open(f) as picture:  # a pipe swapped in after the listing never hangs
        picture.load()
        return transform(picture)


def unreadable(exc: BaseException) -> str:
    """The reason shown for a skipped image."""
    return f"not a readable image ({describe_exception(exc, 120)})"


def batches(
    items: Iterable[T], read: Callable[[T], "torch.Tensor"], size: int, on_skip: Callable[[T, str], None]
) -> Iterator[tuple[list[T], "torch.Tensor"]]:
    """`read(item)` for each item, stacked `size` at a time; an item `read` fails on with one of
    `UNREADABLE` goes to `on_skip(item, reason)` and is left out."""
    import torch

    done: list[T] = []
    tensors: list[torch.Tensor] = []
    for item in items:
        try:
            tensors.append(read(item))
        except UNREADABLE as exc:
            on_skip(item, unreadable(exc))
            continue
        done.append(item)
        if len(done) == size:
            yield done, torch.stack(tensors)
            done, tensors = [], []
    if done:
        yield done, torch.stack(tensors)


def find_images(paths: Iterable[str | Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files given directly (whatever their suffix) and image files under given folders, recursively.

    Returns:
        (image paths in the order given, folders sorted; [(path, reason)] for paths that do not exist
        or are not regular files, such as a named pipe, which would block the read).
    """
    found: list[Path] = []
    missing: list[tuple[Path, str]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.suffix.lower() in IMAGE_SUFFIXES
                    and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)
                )
            )
        elif path.is_file():
            found.append(path)
        elif path.exists():  # a named pipe, socket or device would block or never end
            missing.append((path, f"not a regular file ({not_regular(path)})"))
        else:
            missing.append((path, "no such file or folder"))
    return list(dict.fromkeys(found)), missing  # a file named both alone and inside its folder: once


def images_or_skips(
    paths: Sequence[str | Path], err: Any, verb: str, flag: str
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """`find_images` for a command: each path that cannot be read is said on `err` (a rich
    console) as skipped; none left is a UsageError ("no images to VERB", at the FLAG argument)."""
    from rich.markup import escape

    images, missing = find_images(paths)
    for path, reason in missing:
        err.print(f"[yellow]skipped[/yellow] {escape(str(path))}: {escape(reason)}")
    if not images:
        raise UsageError(
            f"no images to {verb}",
            origin=Origin("flag", flag),
            found=" ".join(map(str, paths)),
            expected="image files, or folders holding " + ", ".join(sorted(IMAGE_SUFFIXES)),
        )
    return images, missing


__all__ = ["IMAGE_SUFFIXES", "UNREADABLE", "decode", "unreadable", "batches", "find_images", "images_or_skips"]
