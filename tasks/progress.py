from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(total: int | None, label: str, unit: str = "sample") -> Iterator[Callable[[int], None]]:
    """A terminal progress bar for long model work; Prefect's logs show the stage around it."""
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=label, unit=unit, dynamic_ncols=True) as bar:
        yield bar.update
