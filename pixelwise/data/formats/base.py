"""What every on-disk dataset format shares: samples are dicts, loaded then transformed.

Bad files: a sample whose files cannot be used raises :class:`~pixelwise.errors.DataError`
(file + problem + fix), in the main process and in DataLoader worker processes alike
(:class:`LoaderDataError`). :class:`SkipBadSamples` leaves such samples out and counts them
(``skip_bad_samples: true`` in a training config, ``--skip-bad-samples`` on the CLI).
"""
from __future__ import annotations

import sys
from typing import Any

from torch.utils.data import Dataset, get_worker_info

from pixelwise.errors import DataError

__all__ = ["LoaderDataError", "SampleDataset", "SkipBadSamples", "skip_bad_samples"]


class LoaderDataError(DataError):
    """A :class:`DataError` raised while a DataLoader worker process loaded a sample.

    PyTorch re-raises a worker's exception in the main process as ``type(e)(text)``, where
    ``text`` is the worker's whole traceback; a plain DataError (three arguments) cannot be
    rebuilt that way and would come out as a RuntimeError with a traceback in its message.
    This class takes that one argument and recovers the original one-line message
    (``FILE: problem (fix)``), so the CLI prints the same ``error: ...`` line whatever the
    number of workers.
    """

    def __init__(self, path: object, problem: str | None = None, fix: str | None = None):
        if problem is not None:  # raised in the worker, from the original error's parts
            super().__init__(path, problem, fix)
            return
        text = str(path)
        marker = f"{type(self).__module__}.{type(self).__qualname__}: "
        start = text.rfind(marker)
        message = text[start + len(marker):].strip() if start >= 0 else text.strip()
        file, sep, rest = message.partition(": ")
        self.path, self.problem, self.fix = (file, rest, None) if sep else ("", message, None)
        Exception.__init__(self, message)

    @classmethod
    def from_error(cls, e: DataError) -> LoaderDataError:
        return cls(e.path, e.problem, e.fix)


class SampleDataset(Dataset):
    """Map-style dataset of sample dicts (DESIGN.md contract). Subclasses implement
    ``__len__`` and ``load(index)`` (the sample as stored); indexing applies ``self.transforms``."""

    transforms: Any = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def load(self, index: int) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        try:
            sample = self.load(index % len(self))
        except DataError as e:
            if get_worker_info() is not None and not isinstance(e, LoaderDataError):
                raise LoaderDataError.from_error(e) from None
            raise
        if self.transforms is not None:
            sample = self.transforms(sample)
        return sample


class SkipBadSamples(Dataset):
    """The usable samples of ``base``; the others are left out and counted.

    Every sample is loaded once here, at construction (``base.load`` for a
    :class:`SampleDataset`, without transforms; ``base[i]`` otherwise): one that raises a
    :class:`~pixelwise.errors.DataError` (unreadable or truncated image, mask of another
    size, label out of range, missing file, ...) is recorded in :attr:`bad` and left out, so
    batches and metrics only ever see good samples, with any number of DataLoader workers.
    The cost is one extra read of the split.

    Indexing, ``load`` and ``transforms`` (read and write) go to ``base``; other attributes
    (``classes``, ``root``, ``annotation_file``, ...) are those of ``base``.
    """

    def __init__(self, base: Dataset) -> None:
        object.__setattr__(self, "base", base)
        load = base.load if isinstance(base, SampleDataset) else base.__getitem__
        bad: list[DataError] = []
        keep: list[int] = []
        for i in range(len(base)):  # type: ignore[arg-type]
            try:
                load(i)
            except DataError as e:
                bad.append(e)
            else:
                keep.append(i)
        object.__setattr__(self, "indices", keep)
        object.__setattr__(self, "bad", bad)

    @property
    def num_skipped(self) -> int:
        """How many samples were left out."""
        return len(self.bad)

    @property
    def num_total(self) -> int:
        """Samples in ``base``, good and bad."""
        return len(self.indices) + len(self.bad)

    def report(self) -> dict[str, Any]:
        """``{"count", "total", "samples": [{"file", "problem", "fix"}]}`` for a metrics JSON."""
        return {"count": self.num_skipped, "total": self.num_total,
                "samples": [{"file": e.path, "problem": e.problem, "fix": e.fix} for e in self.bad]}

    def warning(self, what: str = "split") -> str | None:
        """One line for the user (None when nothing was skipped)."""
        if not self.bad:
            return None
        first = self.bad[0]
        more = f"; and {len(self.bad) - 1} more" if len(self.bad) > 1 else ""
        return (f"warning: skipped {len(self.bad)} bad sample(s) of {self.num_total} in {what} "
                f"(first: {first}{more})")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.base[self.indices[index]]

    def load(self, index: int) -> dict[str, Any]:
        return self.base.load(self.indices[index])

    @property
    def transforms(self) -> Any:
        return getattr(self.base, "transforms", None)

    @transforms.setter
    def transforms(self, value: Any) -> None:
        self.base.transforms = value

    def __getattr__(self, name: str) -> Any:
        if name in ("base", "indices", "bad"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def __repr__(self) -> str:
        return f"SkipBadSamples({self.base!r}, kept={len(self.indices)}, skipped={len(self.bad)})"


def skip_bad_samples(ds: Dataset, enabled: bool = True, what: str = "split", *, quiet: bool = False) -> Dataset:
    """``SkipBadSamples(ds)`` when ``enabled`` (printing its warning line to stderr unless
    ``quiet``), else ``ds`` unchanged: the one call a task makes where it opens a dataset."""
    if not enabled:
        return ds
    wrapped = SkipBadSamples(ds)
    line = wrapped.warning(what)
    if line and not quiet:
        print(line, file=sys.stderr)
    return wrapped
