"""The radiograph files a prediction run reads: finding, naming, reading ahead.

Output names: the input's stem. Where two inputs share a stem (e.g.
`a/x.png` and `b/x.dcm`), each of them is named by its path relative to the
deepest folder common to all inputs, suffix included, with path separators
and dots turned into `__` and `_`: `a__x_png`, `b__x_dcm`.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from vertjax import imaging


def find_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Expands folders (recursively, sorted) into radiograph files.

    A folder contributes files with an image suffix (`imaging.SUFFIXES`) or
    the DICOM magic, skipping hidden files; files named explicitly are kept
    whatever their suffix (and fail later if unreadable), and so are paths
    that do not exist, so that they are reported like any unreadable file.
    Each file appears once.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            candidates = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
                and (p.suffix.lower() in imaging.SUFFIXES or imaging.is_dicom(p))
            )
        else:
            candidates = [path]
        for p in candidates:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                found.append(p)
    return found


def output_names(files: Sequence[Path]) -> list[str]:
    """A distinct output stem per input file (see the module docstring).

    Stems are compared case-insensitively so that outputs do not collide on
    case-insensitive file systems either.
    """
    stems = [f.stem for f in files]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s.lower()] = counts.get(s.lower(), 0) + 1
    resolved = [f.resolve() for f in files]
    common = Path(os.path.commonpath([str(r.parent) for r in resolved])) if files else Path()
    names = []
    for r, stem in zip(resolved, stems, strict=True):
        if counts[stem.lower()] == 1:
            names.append(stem)
        else:
            rel = r.relative_to(common).as_posix()
            names.append(rel.replace("/", "__").replace(".", "_"))
    # A disambiguated name could still equal another file's plain stem
    # (e.g. a file literally called `a__x_png.png`): number the later ones.
    taken: dict[str, int] = {}
    unique = []
    for name in names:
        key = name.lower()
        if key in taken:
            taken[key] += 1
            name = f"{name}-{taken[key]}"
        else:
            taken[key] = 1
        unique.append(name)
    return unique


def prefetch(
    files: Sequence[Path], workers: int, depth: int
) -> Iterator[tuple[int, imaging.Radiograph | Exception]]:
    """Reads files in a thread pool, at most `depth` ahead, yielding in order.

    Decoding (PIL, pydicom, numpy) releases the GIL for most of its time, so
    threads overlap reading with the network; the bound keeps memory flat
    however many large radiographs there are.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        pending: list[tuple[int, concurrent.futures.Future]] = []
        next_index = 0
        while next_index < len(files) or pending:
            while next_index < len(files) and len(pending) < depth:
                pending.append(
                    (next_index, pool.submit(imaging.read_radiograph, files[next_index]))
                )
                next_index += 1
            index, future = pending.pop(0)
            try:
                yield index, future.result()
            except (imaging.ImageError, OSError, ValueError, MemoryError) as e:
                yield index, e


def reason(error: Exception) -> str:
    """The fault of an unreadable file, without the path prefix that ImageError carries."""
    if isinstance(error, imaging.ImageError):
        return error.reason
    return f"{type(error).__name__}: {error}"
