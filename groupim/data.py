"""Load a GroupIM dataset (nine CSV files) into scipy CSR matrices.

A dataset folder contains the nine files named in FILES, each with a header row:
`user,item` for the user-item files, `group,item` for the group-item files and
`group,user` for group_users.csv. Ids are non-negative integers, and an id written as a
float (`516.0`) is accepted. Each user-item split (train, val, test) and each group
split is one contiguous id range, and the ranges of different splits are disjoint.

Dimension names: U users, I items, G groups. A matrix name gives its orientation:
`user_items` is users x items and `group_members` is groups x users. Every matrix is
binary float32 CSR with sorted indices.

load_dataset validates the files (DataError names the file, the CSV line with the
header as line 1, the problem and the fix) and caches the parsed matrices as .npz under
$GROUPIM_CACHE or ~/.cache/groupim, keyed by a SHA-256 over the CSV bytes.
load_dataset(None) downloads the public Weeplaces split into that cache folder first.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import logging
import math
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

logger = logging.getLogger(__name__)

FILES = (
    "train_ui", "val_ui_tr", "val_ui_te", "test_ui_tr", "test_ui_te",
    "train_gi", "val_gi", "test_gi", "group_users",
)
_COLUMNS = {
    "train_ui": ("user", "item"),
    "val_ui_tr": ("user", "item"),
    "val_ui_te": ("user", "item"),
    "test_ui_tr": ("user", "item"),
    "test_ui_te": ("user", "item"),
    "train_gi": ("group", "item"),
    "val_gi": ("group", "item"),
    "test_gi": ("group", "item"),
    "group_users": ("group", "user"),
}
_UI_FILES = ("train_ui", "val_ui_tr", "val_ui_te", "test_ui_tr", "test_ui_te")
_GI_FILES = ("train_gi", "val_gi", "test_gi")

# Public Weeplaces split of the GroupIM authors (github.com/CrowdDynamicsLab/GroupIM,
# BSD 3-Clause), with the SHA-256 of each file at commit 899890e3 of that repository.
# NOTE: the URL follows the master branch, so a later change of a file there shows up
# as a checksum mismatch rather than as a silently different dataset.
WEEPLACES_URL = "https://raw.githubusercontent.com/CrowdDynamicsLab/GroupIM/master/data/weeplaces/"
WEEPLACES_SHA256 = {
    "train_ui.csv": "921cf8c094c95ae6e17b80f9574f5402d4cb1f7f37a25a1a4ed99888066c2293",
    "val_ui_tr.csv": "63de80c0b0bac829ed094400b3a429dba5f8f0b4233fb7d82355157a00ce863e",
    "val_ui_te.csv": "09f511255a2e43aecfa841274c36ca1e0c77a6d4f1b8f550300de70c4cd03c1f",
    "test_ui_tr.csv": "705bdc7071523cdfbf32de73c5d1ecacd5dde314ac4bbec53b682893cc1d390f",
    "test_ui_te.csv": "785df25b1b40b71f3e9bed3caa16a6a7f72bac4145f8de8034ee7a6b094d3cdc",
    "train_gi.csv": "25379860a3c64f5c70fed3c87036445ae10149e11daa5ca31eabc006de7ba120",
    "val_gi.csv": "34a5a4d261618d6781e998c8749e194aec5f88dbee6b0f5a76e44ac313e421dc",
    "test_gi.csv": "a36e907fc5728c2c16bc91a21cfff02d1ffcce9ae876934f3a6a01b5b5d30349",
    "group_users.csv": "4c09d4e97f68e4cb075c6c452645288e8bfd1066a6fffc6844de29241c343891",
}
DATA_URL_ENV = "GROUPIM_DATA_URL"  # overrides WEEPLACES_URL, e.g. for a mirror
CACHE_ENV = "GROUPIM_CACHE"  # cache folder, default ~/.cache/groupim
DOWNLOAD_TIMEOUT_S = 60.0  # per connection attempt and per read

# Bump when the parsed layout or the validation changes, so old cache files are ignored.
_CACHE_FORMAT = 1
# Ids index int32 CSR arrays, so larger ids are rejected.
_MAX_ID = int(np.iinfo(np.int32).max)
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


class DataError(ValueError):
    """Invalid or unavailable dataset. The message names the file, the line and the fix."""


@dataclass(frozen=True, eq=False)
class UserSplit:
    """Validation or test users with their fold-in and held-out items."""

    user_ids: np.ndarray  # int64 [U_split], global user ids, ascending and contiguous
    fold_in: sp.csr_matrix  # [U_split, I], rows follow user_ids
    held_out: sp.csr_matrix  # [U_split, I], rows follow user_ids


@dataclass(frozen=True, eq=False)
class GroupSplit:
    """Groups of one split, whose global ids are first_group_id + row."""

    first_group_id: int
    group_members: sp.csr_matrix  # [G_split, n_users]
    group_items: sp.csr_matrix  # [G_split, I]

    @property
    def n_groups(self) -> int:
        return self.group_items.shape[0]


@dataclass(frozen=True, eq=False)
class GroupIMData:
    """A validated GroupIM dataset."""

    n_users: int
    n_items: int
    train_user_items: sp.csr_matrix  # [n_train_users, I] from train_ui only
    member_items: sp.csr_matrix  # [n_users, I] from train_ui, val_ui_tr and test_ui_tr, never *_ui_te
    val_users: UserSplit
    test_users: UserSplit
    train_groups: GroupSplit
    val_groups: GroupSplit
    test_groups: GroupSplit
    checksum: str  # dataset_checksum of the folder read
    source: str  # absolute path of the folder read

    @property
    def n_train_users(self) -> int:
        return self.train_user_items.shape[0]


# ---------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------

def load_dataset(path: str | Path | None = None, *, cache_dir: str | Path | None = None) -> GroupIMData:
    """Load and validate a dataset folder, or the downloaded Weeplaces split when path is None.

    The parsed matrices are cached under cache_dir (default: cache_root()), so a second
    load of the same bytes reads one .npz file. The data folder itself is only read.
    Raises DataError for a missing, unreadable or invalid dataset.
    """
    folder = resolve_data_dir(path, cache_dir=cache_dir)
    checksum = dataset_checksum(folder)
    cache_file = cache_root(cache_dir) / "parsed" / f"{checksum}.v{_CACHE_FORMAT}.npz"

    data = _read_cache(cache_file, checksum, folder)
    if data is not None:
        logger.info("Loaded %s from cache %s", folder, cache_file)
        return data

    start = time.perf_counter()
    data = _parse_dataset(folder, checksum)
    logger.info("Parsed %s in %.2f s", folder, time.perf_counter() - start)
    _write_cache(cache_file, data)
    return data


def resolve_data_dir(path: str | Path | None, *, cache_dir: str | Path | None = None) -> Path:
    """Return a folder that contains the nine CSV files, downloading Weeplaces when path is None.

    Raises DataError when the folder or one of its files is missing.
    """
    if path is None:
        return download_weeplaces(cache_root(cache_dir) / "weeplaces")

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"Data folder {folder} not found. Pass a folder that contains the GroupIM files "
            f"{_file_list(FILES)}."
        )
    missing = [f"{name}.csv" for name in FILES if not (folder / f"{name}.csv").is_file()]
    if missing:
        raise DataError(
            f"{folder}: missing {', '.join(missing)}. A GroupIM data folder must contain all "
            f"nine files {_file_list(FILES)}."
        )
    return folder


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Return the cache folder: cache_dir, else $GROUPIM_CACHE, else ~/.cache/groupim."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "groupim"


def dataset_checksum(folder: str | Path) -> str:
    """Return the SHA-256 hex digest over the nine CSV files of folder.

    The files are hashed in FILES order, each preceded by its name and byte count so
    that moving bytes from one file to the next changes the digest.
    """
    digest = hashlib.sha256()
    for name in FILES:
        path = Path(folder) / f"{name}.csv"
        digest.update(f"{name}.csv\0{path.stat().st_size}\0".encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _file_list(names) -> str:
    return ", ".join(f"{name}.csv" for name in names)


# ---------------------------------------------------------------------------
# Reading one CSV file
# ---------------------------------------------------------------------------

@dataclass
class _Table:
    """Validated ids of one CSV file, duplicates dropped."""

    path: Path
    ids: dict[str, np.ndarray]  # column name -> int64 [rows]
    lines: np.ndarray  # int64 [rows], CSV line number of each row (header is line 1)

    def first_row(self, mask: np.ndarray) -> int:
        """Return the index of the first row where mask is true (rows are in file order)."""
        return int(np.flatnonzero(mask)[0])


def _row_error(path: Path, line: int, problem: str, fix: str) -> DataError:
    return DataError(f"{path}, line {line}: {problem}. {fix}")


def _read_table(folder: Path, name: str) -> _Table:
    path = folder / f"{name}.csv"
    columns = _COLUMNS[name]
    header = _read_header(path, columns)
    values = _read_floats(path, header, columns)  # float64 [rows, 2]
    lines = np.arange(2, len(values) + 2, dtype=np.int64)

    valid = _valid_ids(values)
    if not valid.all():
        # A blank line reads as an all-NaN row. _check_rows raises on the first invalid
        # row that is not a blank line, so only blank lines should be left to drop.
        blank_lines = _check_rows(path, header, columns)
        if not np.isin(lines[~valid], blank_lines).all():
            raise DataError(f"{path}: could not read the ids of some rows. Check that every row is 'id,id'.")
        values, lines = values[valid], lines[valid]

    ids = values.astype(np.int64)  # [rows, 2]
    duplicated = pd.DataFrame(ids).duplicated().to_numpy()
    if duplicated.any():
        logger.warning("%s: dropped %d duplicate rows", path, int(duplicated.sum()))
        ids, lines = ids[~duplicated], lines[~duplicated]

    if len(ids) == 0:
        raise DataError(f"{path}: the file has no data rows. Add at least one '{','.join(columns)}' row.")
    return _Table(path, {column: ids[:, i] for i, column in enumerate(columns)}, lines)


def _read_header(path: Path, columns: tuple[str, str]) -> list[str]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            first_row = next(csv.reader(f), None)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: could not read the file ({exc}).") from exc
    if not first_row:
        raise DataError(f"{path}, line 1: the header is missing. Line 1 must be '{','.join(columns)}'.")

    header = [field.strip() for field in first_row]
    for column in columns:
        if column not in header:
            raise DataError(
                f"{path}, line 1: missing column '{column}' (the header is '{','.join(first_row)}'). "
                f"Line 1 must name the columns {','.join(columns)}."
            )
    return header


def _read_floats(path: Path, header: list[str], columns: tuple[str, str]) -> np.ndarray:
    """Read the id columns as float64 [rows, 2], with NaN where a field is blank or missing.

    Floats are the fast path because group_users.csv writes ids as floats. An exact
    check of each value follows in _valid_ids, and _check_rows explains a failure.
    """
    try:
        with warnings.catch_warnings():
            # pandas only warns when the first data row has more fields than the header.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(
                path,
                header=0,
                names=header,
                index_col=False,
                dtype={column: np.float64 for column in columns},
                skip_blank_lines=False,  # keeps row index + 2 equal to the line number
                encoding="utf-8-sig",
            )
    except (ValueError, pd.errors.ParserWarning, UnicodeDecodeError) as exc:
        # ParserError (a ValueError subclass) reports a row with extra fields, and a plain
        # ValueError a field that is not a number. _check_rows finds and explains the row.
        _check_rows(path, header, columns)
        raise DataError(f"{path}: could not parse the file ({exc}). It must be comma-separated text.") from exc
    return frame[list(columns)].to_numpy(np.float64)


def _valid_ids(values: np.ndarray) -> np.ndarray:
    """Return a bool [rows] mask of rows whose ids are all integers in 0.._MAX_ID."""
    with np.errstate(invalid="ignore"):
        ok = (values >= 0) & (values <= _MAX_ID) & (values == np.floor(values))  # NaN fails every test
    return ok.all(axis=1)


def _check_rows(path: Path, header: list[str], columns: tuple[str, str]) -> np.ndarray:
    """Raise DataError for the first invalid row, else return the line numbers of blank lines.

    This is the slow path: it reads the file line by line with the csv module, and
    runs only after the fast read found a problem.
    """
    positions = [header.index(column) for column in columns]
    blank_lines = []
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.reader(f)
        next(reader)
        for fields in reader:
            line = reader.line_num
            if all(not field.strip() for field in fields):
                blank_lines.append(line)
                continue
            problem = _row_problem(fields, header, columns, positions)
            if problem:
                raise _row_error(
                    path, line, f"'{','.join(fields)}' {problem}",
                    f"Correct or delete this line. Each row must contain a non-negative integer "
                    f"{columns[0]} id and {columns[1]} id.",
                )
    return np.asarray(blank_lines, dtype=np.int64)


def _row_problem(fields: list[str], header: list[str], columns: tuple[str, str], positions: list[int]) -> str | None:
    if len(fields) > len(header):
        return f"has {len(fields)} fields but the header has {len(header)}"
    if len(fields) < len(header):
        return f"is a partial row: it has {len(fields)} of the {len(header)} fields {','.join(header)}"

    for column, position in zip(columns, positions):
        text = fields[position].strip()
        if not text:
            return f"has a blank {column} id"
        value = float(text) if _NUMBER.fullmatch(text) else math.nan
        if math.isnan(value) or (math.isfinite(value) and value != math.floor(value)):
            return f"has the {column} id '{text}', which is not an integer"
        if value < 0:
            return f"has the negative {column} id {text}"
        if value > _MAX_ID:
            return f"has the {column} id {text}, above the maximum {_MAX_ID}"
    return None


# ---------------------------------------------------------------------------
# Checks across files
# ---------------------------------------------------------------------------

def _check_user_ranges(tables: dict[str, _Table]) -> dict[str, tuple[int, int]]:
    """Return the first and last user id of each user split, rejecting overlapping ranges."""
    split_files = {"train": ("train_ui",), "val": ("val_ui_tr", "val_ui_te"), "test": ("test_ui_tr", "test_ui_te")}
    ranges = {}
    for split, names in split_files.items():
        users = np.concatenate([tables[name].ids["user"] for name in names])
        ranges[split] = (int(users.min()), int(users.max()))

    ordered = sorted(ranges, key=lambda split: ranges[split])
    for lower, upper in zip(ordered, ordered[1:]):
        low, high = ranges[lower]
        if ranges[upper][0] > high:
            continue
        for name in split_files[upper]:
            table = tables[name]
            inside = (table.ids["user"] >= low) & (table.ids["user"] <= high)
            if inside.any():
                row = table.first_row(inside)
                raise _row_error(
                    table.path, int(table.lines[row]),
                    f"user {table.ids['user'][row]} is inside the range "
                    f"{low}-{high} of the {lower} users ({_file_list(split_files[lower])})",
                    "The train, val and test users must be disjoint contiguous id ranges. "
                    "Renumber the users of one split.",
                )
    return ranges


def _check_group_ranges(tables: dict[str, _Table], n_items: int) -> dict[str, tuple[int, int]]:
    """Return the first and last group id of each *_gi file after checking ranges and items."""
    ranges = {}
    for name in _GI_FILES:
        table = tables[name]
        groups = table.ids["group"]
        low, high = int(groups.min()), int(groups.max())

        present = np.zeros(high - low + 1, dtype=bool)
        present[groups - low] = True
        if not present.all():
            missing = low + int(np.argmin(present))
            raise _row_error(
                table.path, int(table.lines[table.first_row(groups > missing)]),
                f"group ids jump past group {missing}, which has no items in this file",
                f"The groups of a split must be one contiguous id range ({low}-{high} here). "
                f"Add the items of group {missing} or renumber the groups.",
            )

        too_large = table.ids["item"] >= n_items
        if too_large.any():
            row = table.first_row(too_large)
            raise _row_error(
                table.path, int(table.lines[row]),
                f"item {table.ids['item'][row]} is above the largest item id of the user-item files "
                f"({n_items - 1}), which sets n_items",
                "Delete this line, or add the item to a user-item file (train_ui.csv, *_ui_tr.csv or *_ui_te.csv).",
            )
        ranges[name] = (low, high)

    ordered = sorted(_GI_FILES, key=lambda name: ranges[name])
    for lower, upper in zip(ordered, ordered[1:]):
        low, high = ranges[lower]
        if ranges[upper][0] > high:
            continue
        table = tables[upper]
        row = table.first_row(table.ids["group"] <= high)
        raise _row_error(
            table.path, int(table.lines[row]),
            f"group {table.ids['group'][row]} is inside the group range {low}-{high} of {lower}.csv",
            "Each group belongs to one split, so the group ids of train_gi.csv, val_gi.csv "
            "and test_gi.csv must be disjoint ranges. Renumber the groups of one split.",
        )
    return ranges


def _check_members(tables: dict[str, _Table], group_ranges: dict[str, tuple[int, int]], n_users: int) -> None:
    members = tables["group_users"]
    groups, users = members.ids["group"], members.ids["user"]

    too_large = users >= n_users
    if too_large.any():
        row = members.first_row(too_large)
        raise _row_error(
            members.path, int(members.lines[row]),
            f"member user {users[row]} is above the largest user id of the user-item files ({n_users - 1}), "
            "which sets n_users",
            "Delete this line, or add the user's items to a user-item file.",
        )

    in_split = np.zeros(len(groups), dtype=bool)
    for low, high in group_ranges.values():
        in_split |= (groups >= low) & (groups <= high)
    if not in_split.all():
        row = members.first_row(~in_split)
        described = ", ".join(f"{name}.csv {low}-{high}" for name, (low, high) in group_ranges.items())
        raise _row_error(
            members.path, int(members.lines[row]),
            f"group {groups[row]} has members but no items, because its id is outside the group ranges "
            f"({described})",
            "Add the group's items to one of the *_gi.csv files, or delete its rows here.",
        )

    # Every group id in group_users is inside a split range now, so the mask covers them.
    has_members = np.zeros(1 + max(high for _, high in group_ranges.values()), dtype=bool)
    has_members[groups] = True
    for name in group_ranges:
        table = tables[name]
        without = ~has_members[table.ids["group"]]
        if without.any():
            row = table.first_row(without)
            raise _row_error(
                table.path, int(table.lines[row]),
                f"group {table.ids['group'][row]} has no members in group_users.csv",
                "Add the group's members to group_users.csv, or delete its rows here.",
            )


# ---------------------------------------------------------------------------
# Building the matrices
# ---------------------------------------------------------------------------

def _binary_csr(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    matrix = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=shape)
    matrix.sum_duplicates()
    matrix.data[:] = 1.0  # rows repeated across files would otherwise count twice
    matrix.sort_indices()
    return matrix


# The model has an embedding row for every id up to the largest, so ids must be
# numbered densely: a stray huge id would allocate gigabytes of unused rows.
_MAX_ID_GAP_FACTOR = 2
_MAX_ID_GAP_SLACK = 1000


def _check_dense_ids(tables: dict[str, _Table], column: str, count: int) -> None:
    """Raise when the largest user or item id is far above the number of distinct ids."""
    distinct = len(np.unique(np.concatenate([tables[name].ids[column] for name in _UI_FILES])))
    if count <= _MAX_ID_GAP_FACTOR * distinct + _MAX_ID_GAP_SLACK:
        return
    name = max(_UI_FILES, key=lambda file: tables[file].ids[column].max())
    table = tables[name]
    row = int(np.argmax(table.ids[column]))
    raise _row_error(
        table.path,
        int(table.lines[row]),
        f"the {column} id {count - 1} is far above the {distinct} distinct {column} ids of the user-item files",
        f"Number {column} ids densely from 0, or correct this line",
    )


def _parse_dataset(folder: Path, checksum: str) -> GroupIMData:
    tables = {name: _read_table(folder, name) for name in FILES}
    n_users = 1 + max(int(tables[name].ids["user"].max()) for name in _UI_FILES)
    n_items = 1 + max(int(tables[name].ids["item"].max()) for name in _UI_FILES)

    _check_dense_ids(tables, "user", n_users)
    _check_dense_ids(tables, "item", n_items)
    user_ranges = _check_user_ranges(tables)
    group_ranges = _check_group_ranges(tables, n_items)
    _check_members(tables, group_ranges, n_users)

    train = tables["train_ui"].ids
    train_user_items = _binary_csr(train["user"], train["item"], (user_ranges["train"][1] + 1, n_items))

    history = [tables[name].ids for name in ("train_ui", "val_ui_tr", "test_ui_tr")]
    member_items = _binary_csr(
        np.concatenate([ids["user"] for ids in history]),
        np.concatenate([ids["item"] for ids in history]),
        (n_users, n_items),
    )

    def user_split(split: str) -> UserSplit:
        low, high = user_ranges[split]
        shape = (high - low + 1, n_items)
        fold_in, held_out = tables[f"{split}_ui_tr"].ids, tables[f"{split}_ui_te"].ids
        return UserSplit(
            user_ids=np.arange(low, high + 1, dtype=np.int64),
            fold_in=_binary_csr(fold_in["user"] - low, fold_in["item"], shape),
            held_out=_binary_csr(held_out["user"] - low, held_out["item"], shape),
        )

    members = tables["group_users"].ids

    def group_split(name: str) -> GroupSplit:
        low, high = group_ranges[name]
        items = tables[name].ids
        in_split = (members["group"] >= low) & (members["group"] <= high)
        return GroupSplit(
            first_group_id=low,
            group_members=_binary_csr(members["group"][in_split] - low, members["user"][in_split], (high - low + 1, n_users)),
            group_items=_binary_csr(items["group"] - low, items["item"], (high - low + 1, n_items)),
        )

    return GroupIMData(
        n_users=n_users,
        n_items=n_items,
        train_user_items=train_user_items,
        member_items=member_items,
        val_users=user_split("val"),
        test_users=user_split("test"),
        train_groups=group_split("train_gi"),
        val_groups=group_split("val_gi"),
        test_groups=group_split("test_gi"),
        checksum=checksum,
        source=str(folder.resolve()),
    )


# ---------------------------------------------------------------------------
# Cache of parsed matrices
# ---------------------------------------------------------------------------

_MATRICES = (
    "train_user_items", "member_items",
    "val_users.fold_in", "val_users.held_out", "test_users.fold_in", "test_users.held_out",
    "train_groups.group_members", "train_groups.group_items",
    "val_groups.group_members", "val_groups.group_items",
    "test_groups.group_members", "test_groups.group_items",
)


def _get(data: GroupIMData, dotted: str):
    value = data
    for attribute in dotted.split("."):
        value = getattr(value, attribute)
    return value


def _write_cache(cache_file: Path, data: GroupIMData) -> None:
    """Store the matrices as CSR index arrays (all values are 1). Failure only logs a warning."""
    arrays = {"n_users": np.int64(data.n_users), "n_items": np.int64(data.n_items)}
    for key in _MATRICES:
        matrix = _get(data, key)
        arrays[f"{key}.indptr"] = matrix.indptr
        arrays[f"{key}.indices"] = matrix.indices
        arrays[f"{key}.shape"] = np.asarray(matrix.shape, dtype=np.int64)
    for split in ("val_users", "test_users"):
        arrays[f"{split}.user_ids"] = _get(data, split).user_ids
    for split in ("train_groups", "val_groups", "test_groups"):
        arrays[f"{split}.first_group_id"] = np.int64(_get(data, split).first_group_id)

    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=cache_file.parent, prefix=cache_file.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp_name, cache_file)  # atomic, so a reader never sees half a file
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    except OSError as exc:
        logger.warning("Could not write the dataset cache %s (%s); the next load parses the CSV files again", cache_file, exc)


def _read_cache(cache_file: Path, checksum: str, folder: Path) -> GroupIMData | None:
    """Return the cached dataset, or None when there is no usable cache file."""
    if not cache_file.is_file():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as arrays:
            n_items = int(arrays["n_items"])

            def matrix(key: str) -> sp.csr_matrix:
                indices = arrays[f"{key}.indices"]
                data = np.ones(len(indices), dtype=np.float32)
                shape = tuple(int(size) for size in arrays[f"{key}.shape"])
                return sp.csr_matrix((data, indices, arrays[f"{key}.indptr"]), shape=shape)

            def user_split(split: str) -> UserSplit:
                return UserSplit(arrays[f"{split}.user_ids"], matrix(f"{split}.fold_in"), matrix(f"{split}.held_out"))

            def group_split(split: str) -> GroupSplit:
                return GroupSplit(
                    int(arrays[f"{split}.first_group_id"]),
                    matrix(f"{split}.group_members"),
                    matrix(f"{split}.group_items"),
                )

            return GroupIMData(
                n_users=int(arrays["n_users"]),
                n_items=n_items,
                train_user_items=matrix("train_user_items"),
                member_items=matrix("member_items"),
                val_users=user_split("val_users"),
                test_users=user_split("test_users"),
                train_groups=group_split("train_groups"),
                val_groups=group_split("val_groups"),
                test_groups=group_split("test_groups"),
                checksum=checksum,
                source=str(folder.resolve()),
            )
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        logger.warning("Ignoring the unreadable dataset cache %s (%s); parsing the CSV files", cache_file, exc)
        return None


# ---------------------------------------------------------------------------
# Weeplaces download
# ---------------------------------------------------------------------------

def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_weeplaces(folder: str | Path, *, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download the nine Weeplaces files into folder and return it.

    Files already there with the expected SHA-256 (WEEPLACES_SHA256) are kept. Each
    download goes to a temporary file that is renamed only when its hash matches. The
    base URL is $GROUPIM_DATA_URL, else WEEPLACES_URL. Raises DataError when a download
    fails or a hash differs.
    """
    folder = Path(folder)
    expected = WEEPLACES_SHA256  # read at call time so tests can point it at other files
    base_url = os.environ.get(DATA_URL_ENV) or WEEPLACES_URL
    if not base_url.endswith("/"):
        base_url += "/"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"Could not create the download folder {folder} ({exc}). Set {CACHE_ENV} to a writable "
            "folder, or pass --data DIR with a folder that contains the nine Weeplaces files."
        ) from exc

    missing = []
    for name in FILES:
        path = folder / f"{name}.csv"
        if not path.is_file():
            missing.append(f"{name}.csv")
            continue
        actual = _file_sha256(path)
        if actual != expected[path.name]:
            logger.warning("%s has SHA-256 %s, expected %s; downloading it again", path, actual, expected[path.name])
            missing.append(path.name)

    for index, filename in enumerate(missing):
        url = base_url + filename
        logger.info("Downloading %s to %s", url, folder)
        try:
            _download_checked(url, folder / filename, expected[filename], timeout)
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as exc:
            if isinstance(exc, urllib.error.HTTPError):
                reason = f"HTTP {exc.code} {exc.reason}"
            else:
                reason = getattr(exc, "reason", exc)
            raise DataError(
                f"Downloading {url} failed ({reason}). Missing Weeplaces files: {', '.join(missing[index:])}. "
                f"Put the nine files ({_file_list(FILES)}) into {folder}, or pass --data DIR with a folder "
                "that contains them."
            ) from exc
    return folder


def _download_checked(url: str, target: Path, expected_sha256: str, timeout: float) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)

        if digest.hexdigest() != expected_sha256:
            raise DataError(
                f"{url}: the downloaded {target.name} has SHA-256 {digest.hexdigest()}, expected "
                f"{expected_sha256}, so it was not saved. The server may hold another version of "
                f"the file. Put the expected file into {target.parent}, or pass --data DIR."
            )
        os.replace(tmp_name, target)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# Small slices for tests and smoke runs
# ---------------------------------------------------------------------------

def write_slice(
    src: str | Path,
    dst: str | Path,
    groups_per_split: int | tuple[int, int, int],
    *,
    cache_dir: str | Path | None = None,
) -> Path:
    """Write a small valid dataset made of the first groups of each split of src, and return dst.

    groups_per_split is the number of train, val and test groups to keep (one int for
    all three), and a split with fewer groups is kept whole. The slice keeps the members
    of the kept groups and, so that no user split is empty, the first n users with items
    of each user split (n is that split's group count), each with all their user-item
    rows. Users and items are renumbered densely, so slice ids differ from src ids.
    Members without items come first, then train, val and test users, each block in
    its original order. Group ids run from 0 over the train, val and test groups.
    """
    counts = (groups_per_split,) * 3 if isinstance(groups_per_split, (int, np.integer)) else tuple(groups_per_split)
    if len(counts) != 3 or any(not isinstance(count, (int, np.integer)) or count < 1 for count in counts):
        raise ValueError(f"groups_per_split must be a positive int or three positive ints, got {groups_per_split!r}")
    dst = Path(dst)
    if dst.exists() and Path(src).resolve() == dst.resolve():
        raise ValueError(f"write_slice would overwrite its source {src}; pass another dst")

    data = load_dataset(src, cache_dir=cache_dir)
    group_splits = (data.train_groups, data.val_groups, data.test_groups)
    kept_groups = [
        (split.group_members[: min(count, split.n_groups)], split.group_items[: min(count, split.n_groups)])
        for split, count in zip(group_splits, counts)
    ]

    user_order, train_users, user_splits = _slice_users(data, kept_groups, counts)
    user_map = np.full(data.n_users, -1, dtype=np.int64)
    user_map[user_order] = np.arange(len(user_order))

    ui_rows = {"train_ui": data.train_user_items[train_users]}
    ui_ids = {"train_ui": train_users}
    for split, (split_data, kept) in user_splits.items():
        ui_rows[f"{split}_ui_tr"] = split_data.fold_in[kept - split_data.user_ids[0]]
        ui_rows[f"{split}_ui_te"] = split_data.held_out[kept - split_data.user_ids[0]]
        ui_ids[f"{split}_ui_tr"] = ui_ids[f"{split}_ui_te"] = kept

    # Items of group files only get the lowest new ids, so that the highest item id
    # occurs in a user-item file and n_items of the slice covers every item.
    ui_items = np.unique(np.concatenate([matrix.indices for matrix in ui_rows.values()]))
    group_items = np.unique(np.concatenate([items.indices for _, items in kept_groups]))
    item_order = np.concatenate([np.setdiff1d(group_items, ui_items), ui_items])
    item_map = np.full(data.n_items, -1, dtype=np.int64)
    item_map[item_order] = np.arange(len(item_order))

    dst.mkdir(parents=True, exist_ok=True)
    for name, matrix in ui_rows.items():
        rows = matrix.tocoo()
        _write_pairs(dst / f"{name}.csv", ("user", "item"), user_map[ui_ids[name][rows.row]], item_map[rows.col])

    first_group = 0
    member_pairs = []
    for name, (members, items) in zip(_GI_FILES, kept_groups):
        items = items.tocoo()
        _write_pairs(dst / f"{name}.csv", ("group", "item"), first_group + items.row, item_map[items.col])
        members = members.tocoo()
        member_pairs.append((first_group + members.row, user_map[members.col]))
        first_group += items.shape[0]
    _write_pairs(
        dst / "group_users.csv", ("group", "user"),
        np.concatenate([groups for groups, _ in member_pairs]),
        np.concatenate([users for _, users in member_pairs]),
    )
    logger.info(
        "Wrote a slice of %s to %s: %d groups, %d users, %d items",
        src, dst, first_group, len(user_order), len(item_order),
    )
    return dst


def _slice_users(
    data: GroupIMData,
    kept_groups: list[tuple[sp.csr_matrix, sp.csr_matrix]],
    counts: tuple[int, int, int],
) -> tuple[np.ndarray, np.ndarray, dict[str, tuple[UserSplit, np.ndarray]]]:
    """Choose the users of a slice.

    Returns the old user ids in their new order, the kept train users, and for "val"
    and "test" the source UserSplit with the kept user ids.
    """
    members = np.unique(np.concatenate([group_members.indices for group_members, _ in kept_groups]))

    train_has_items = np.flatnonzero(np.diff(data.train_user_items.indptr) > 0)
    train_users = np.union1d(np.intersect1d(members, train_has_items), train_has_items[: counts[0]])

    user_splits = {}
    for split, count in (("val", counts[1]), ("test", counts[2])):
        split_data: UserSplit = getattr(data, f"{split}_users")
        item_counts = np.diff(split_data.fold_in.indptr) + np.diff(split_data.held_out.indptr)
        has_items = split_data.user_ids[item_counts > 0]
        user_splits[split] = (split_data, np.union1d(np.intersect1d(members, has_items), has_items[:count]))

    with_items = np.concatenate([train_users] + [kept for _, kept in user_splits.values()])
    without_items = np.setdiff1d(members, with_items)
    return np.concatenate([without_items, with_items]), train_users, user_splits


def _write_pairs(path: Path, header: tuple[str, str], first: np.ndarray, second: np.ndarray) -> None:
    order = np.lexsort((second, first))
    frame = pd.DataFrame({header[0]: first[order], header[1]: second[order]})
    frame.to_csv(path, index=False)
