"""Where the tool may write: nothing it writes lands inside a folder it reads.

Every command that takes an output (`output_dir` of the stages and of `apply`, `atlas --out`,
`compare --out`) checks it here against the folders it reads (`dataset.root`, `fit.features`,
`fit.mapping_from`, `--fit`, the runs it compares). Otherwise a folder dataset would take the
tool's own PNGs and JPEGs for images on the next pass, and a run's dataset fingerprint would change
under it. An input inside the output is refused too: the output's files could land among the
input's. Paths are compared resolved (symlinks, `..`, relative spellings) and, where both exist,
by the file system's identity of the folders (a bind mount, a case-insensitive file system).
Object-store URIs (s3://...) hold no local folder and are skipped.
"""

import os
from pathlib import Path

from core.errors import UserError
from storage import uris


class PlacementError(UserError, ValueError):
    """An output placed inside an input, or holding one; the message names both and the fix."""


def _resolved(location: Path | str, key: str) -> Path:
    try:
        return Path(location).resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop (RuntimeError up to Python 3.12)
        raise PlacementError(
            f"{key}={location} cannot be resolved ({err}): name a folder without a symlink loop"
        ) from None


def _within(path: Path, folder: Path) -> bool:
    """`path` is `folder` or lies below it: by name, or by the identity of an existing folder on its way."""
    if path.is_relative_to(folder):
        return True
    try:
        target = folder.stat()
    except OSError:  # not there (yet): the names decide
        return False
    for step in (path, *path.parents):
        try:
            if os.path.samestat(step.stat(), target):
                return True
        except OSError:
            continue
    return False


def refuse_output_in_input(
    output: Path | str, output_key: str, inputs: dict[str, Path | str | None], fix: str | None = None
) -> None:
    """Refuse `output` (a folder or file the command writes, named by its config key or option) where
    it is, or lies inside, one of `inputs` (config key -> a folder the command reads; None: unset),
    or holds one of them. `fix`: what to do instead, where the default (move the output) is not all."""
    if uris.is_uri(output):
        return
    out = _resolved(output, output_key)

    def spelt(key: str, location, resolved: Path) -> str:
        return f"{key}={location}" + (f" (= {resolved})" if str(resolved) != str(location) else "")

    for key, location in inputs.items():
        if location is None or uris.is_uri(location):
            continue
        root = _resolved(location, key)
        if _within(out, root):
            where = "is" if out == root else "lies inside"
            raise PlacementError(
                f"{spelt(output_key, output, out)} {where} {spelt(key, location, root)}: what is "
                "written there would be read as input. " + (fix or f"Put {output_key} outside {root}")
            )
        if _within(root, out):
            raise PlacementError(
                f"{spelt(output_key, output, out)} holds {spelt(key, location, root)}: what is "
                "written there could land among its files. " + (fix or f"Put {output_key} beside {root}, not above it")
            )


def refuse_a_moved_runs_config(config: Path, output_dir: Path, overrides: list[str]) -> None:
    """A run's `config.yaml` records the `output_dir` the run was made in. Read from a copy or a move
    of that run, it would send the stage's work to the original folder, not to the one the user
    named: refused unless `output_dir` is set on the command line."""
    folder = _resolved(Path(config).parent, "--config")
    is_run_record = Path(config).name == "config.yaml" and (folder / "features").is_dir()
    if not is_run_record or any(o.split("=", 1)[0].strip() == "output_dir" for o in overrides):
        return
    if _resolved(output_dir, "output_dir") != folder:
        raise PlacementError(
            f"{config} is the record of the run made in {output_dir}, but it lies in {folder} (a copied or "
            f"moved run): add --set output_dir={folder} to work on {folder}"
        )
