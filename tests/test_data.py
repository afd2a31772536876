"""Tests for groupim.data on a tiny hand-written dataset, a local HTTP server and real Weeplaces.

The tiny dataset has 8 users (train 0-3, val 4-5, test 6-7), 6 items (0-5) and
6 groups (train 0-2, val 3, test 4-5). Val user 5 has a held-out item but no fold-in
item, as some Weeplaces users do.
"""

import functools
import hashlib
import http.server
import logging
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from groupim import data as data_module
from groupim.data import FILES, DataError, load_dataset, resolve_data_dir, write_slice

TINY = {
    "train_ui": "user,item\n0,0\n0,1\n1,1\n1,2\n2,3\n3,4\n",
    "val_ui_tr": "user,item\n4,0\n4,2\n",
    "val_ui_te": "user,item\n4,5\n5,3\n",
    "test_ui_tr": "user,item\n6,1\n7,2\n",
    "test_ui_te": "user,item\n6,4\n7,5\n",
    "train_gi": "group,item\n0,0\n0,1\n1,2\n2,3\n2,4\n",
    "val_gi": "group,item\n3,1\n",
    "test_gi": "group,item\n4,5\n5,0\n",
    # Written as floats, as in Weeplaces.
    "group_users": (
        "group,user\n0,0.0\n0,1.0\n1,1.0\n1,2.0\n2,2.0\n2,3.0\n3,4.0\n3,0.0\n4,6.0\n4,7.0\n5,5.0\n5,1.0\n"
    ),
}


def write_dataset(folder: Path, **changes: str) -> Path:
    """Write TINY into folder, with the files named in changes replaced by their new text."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in {**TINY, **changes}.items():
        (folder / f"{name}.csv").write_text(text)
    return folder


def dense(matrix) -> np.ndarray:
    return matrix.toarray().astype(int)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """Point the default cache at a fresh folder, so no test reads or writes ~/.cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("GROUPIM_CACHE", str(cache))
    monkeypatch.delenv("GROUPIM_DATA_URL", raising=False)
    return cache


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    return write_dataset(tmp_path / "tiny")


# ---------------------------------------------------------------------------
# Loading the tiny dataset
# ---------------------------------------------------------------------------

def test_tiny_sizes(tiny_dir):
    data = load_dataset(tiny_dir)

    assert data.n_users == 8
    assert data.n_items == 6
    assert data.n_train_users == 4
    assert data.train_user_items.shape == (4, 6)
    assert data.member_items.shape == (8, 6)
    assert data.source == str(tiny_dir.resolve())
    assert len(data.checksum) == 64


def test_tiny_user_matrices(tiny_dir):
    data = load_dataset(tiny_dir)

    assert dense(data.train_user_items).tolist() == [
        [1, 1, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 1, 0],
    ]
    # Train rows, then the fold-in items of val and test users; held-out items never.
    assert dense(data.member_items)[4:].tolist() == [
        [1, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
    ]
    assert dense(data.member_items)[:4].tolist() == dense(data.train_user_items).tolist()


def test_tiny_user_splits(tiny_dir):
    data = load_dataset(tiny_dir)

    assert data.val_users.user_ids.tolist() == [4, 5]
    assert data.val_users.user_ids.dtype == np.int64
    assert dense(data.val_users.fold_in).tolist() == [[1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    assert dense(data.val_users.held_out).tolist() == [[0, 0, 0, 0, 0, 1], [0, 0, 0, 1, 0, 0]]
    assert data.test_users.user_ids.tolist() == [6, 7]
    assert dense(data.test_users.fold_in).tolist() == [[0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]]
    assert dense(data.test_users.held_out).tolist() == [[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]]


def test_tiny_group_splits(tiny_dir):
    data = load_dataset(tiny_dir)

    assert [split.first_group_id for split in (data.train_groups, data.val_groups, data.test_groups)] == [0, 3, 4]
    assert [split.n_groups for split in (data.train_groups, data.val_groups, data.test_groups)] == [3, 1, 2]
    assert data.train_groups.group_members.shape == (3, 8)
    assert [row.indices.tolist() for row in data.train_groups.group_members] == [[0, 1], [1, 2], [2, 3]]
    assert [row.indices.tolist() for row in data.train_groups.group_items] == [[0, 1], [2], [3, 4]]
    assert [row.indices.tolist() for row in data.val_groups.group_members] == [[0, 4]]
    assert [row.indices.tolist() for row in data.test_groups.group_members] == [[6, 7], [1, 5]]
    assert [row.indices.tolist() for row in data.test_groups.group_items] == [[5], [0]]


def test_matrices_binary_float32(tiny_dir):
    data = load_dataset(tiny_dir)
    matrices = [
        data.train_user_items, data.member_items,
        data.val_users.fold_in, data.val_users.held_out,
        data.train_groups.group_members, data.test_groups.group_items,
    ]

    for matrix in matrices:
        assert matrix.format == "csr"
        assert matrix.dtype == np.float32
        assert set(matrix.data.tolist()) == {1.0}
        assert matrix.has_sorted_indices


def test_float_and_spaced_ids_accepted(tmp_path):
    folder = write_dataset(tmp_path / "d", train_ui="user,item\n0,0\n 0.0 , 1.0 \n1,1\n1,2\n2,3\n3,4e0\n")

    data = load_dataset(folder)

    assert dense(data.train_user_items)[0].tolist() == [1, 1, 0, 0, 0, 0]
    assert dense(data.train_user_items)[3].tolist() == [0, 0, 0, 0, 1, 0]


def test_extra_columns_ignored(tmp_path):
    folder = write_dataset(tmp_path / "d", val_gi="timestamp, group ,item\n99,3,1\n")

    data = load_dataset(folder)

    assert dense(data.val_groups.group_items).tolist() == [[0, 1, 0, 0, 0, 0]]


def test_blank_lines_ignored(tmp_path):
    folder = write_dataset(tmp_path / "d", train_ui="user,item\n0,0\n\n0,1\n1,1\n1,2\n2,3\n3,4\n\n\n")

    data = load_dataset(folder)

    assert data.train_user_items.nnz == 6


def test_line_numbers_count_blank_lines(tmp_path):
    folder = write_dataset(tmp_path / "d", train_ui="user,item\n0,0\n\n0,1\n1,x\n")

    with pytest.raises(DataError, match=r"train_ui\.csv, line 5: "):
        load_dataset(folder)


def test_duplicates_dropped_with_warning(tmp_path, caplog):
    folder = write_dataset(
        tmp_path / "d",
        train_ui=TINY["train_ui"] + "0,0\n1,2\n0,0\n",
        group_users=TINY["group_users"] + "0,0\n",
    )

    with caplog.at_level(logging.WARNING, logger="groupim.data"):
        data = load_dataset(folder)

    messages = [record.getMessage() for record in caplog.records]
    assert len([m for m in messages if "train_ui.csv" in m]) == 1
    assert any("train_ui.csv: dropped 3 duplicate rows" in m for m in messages)
    assert any("group_users.csv: dropped 1 duplicate rows" in m for m in messages)
    assert data.train_user_items.nnz == 6
    assert data.train_groups.group_members[0].indices.tolist() == [0, 1]


# ---------------------------------------------------------------------------
# Validation: every fault names the file, the line and the problem
# ---------------------------------------------------------------------------

def replace_line(name: str, line: int, text: str | None) -> dict[str, str]:
    """Return a change of TINY[name] with 1-based line replaced by text (deleted when None)."""
    lines = TINY[name].splitlines()
    if text is None:
        del lines[line - 1]
    else:
        lines[line - 1] = text
    return {name: "\n".join(lines) + "\n"}


FAULTS = [
    # case id, changed files, file named, line named, phrase expected in the message
    ("missing column", replace_line("train_ui", 1, "user,itm"), "train_ui.csv", 1, "missing column 'item'"),
    ("no header", {"val_gi": ""}, "val_gi.csv", 1, "header is missing"),
    ("negative id", replace_line("train_ui", 3, "0,-1"), "train_ui.csv", 3, "negative item id"),
    ("non-integer id", replace_line("train_ui", 4, "1,3.5"), "train_ui.csv", 4, "'3.5', which is not an integer"),
    ("text id", replace_line("val_gi", 2, "abc,1"), "val_gi.csv", 2, "'abc', which is not an integer"),
    ("infinite id", replace_line("test_gi", 3, "5,inf"), "test_gi.csv", 3, "'inf', which is not an integer"),
    ("id above int32", replace_line("train_ui", 7, "3,9999999999"), "train_ui.csv", 7, "above the maximum"),
    ("blank id", replace_line("test_ui_te", 3, "7,"), "test_ui_te.csv", 3, "blank item id"),
    ("partial row", replace_line("val_ui_tr", 3, "4"), "val_ui_tr.csv", 3, "partial row"),
    ("extra field", replace_line("train_gi", 4, "1,2,9"), "train_gi.csv", 4, "has 3 fields"),
    ("extra field first row", replace_line("train_gi", 2, "0,0,9"), "train_gi.csv", 2, "has 3 fields"),
    ("sparse item id", replace_line("train_ui", 7, "3,9999999"), "train_ui.csv", 7, "far above the"),
    ("user ranges overlap", replace_line("val_ui_te", 3, "3,3"), "val_ui_te.csv", 3, "inside the range 0-3"),
    ("group id gap", replace_line("train_gi", 4, None), "train_gi.csv", 4, "group 1, which has no items"),
    ("group ranges overlap", {"val_gi": "group,item\n2,1\n3,1\n"}, "val_gi.csv", 2, "range 0-2 of train_gi.csv"),
    ("group item unknown", replace_line("test_gi", 3, "5,6"), "test_gi.csv", 3, "item 6 is above the largest item id"),
    ("member user unknown", replace_line("group_users", 13, "5,8"), "group_users.csv", 13, "member user 8"),
    ("group without items", {"group_users": TINY["group_users"] + "6,1\n"}, "group_users.csv", 14,
     "group 6 has members but no items"),
    # Without its two member rows (lines 12-13 of group_users.csv), test group 5 has no members.
    ("group without members", {"group_users": "".join(TINY["group_users"].splitlines(keepends=True)[:11])},
     "test_gi.csv", 3, "group 5 has no members"),
]


@pytest.mark.parametrize(
    ("changes", "filename", "line", "phrase"),
    [case[1:] for case in FAULTS],
    ids=[case[0] for case in FAULTS],
)
def test_fault_names_file_and_line(tmp_path, changes, filename, line, phrase):
    folder = write_dataset(tmp_path / "d", **changes)

    with pytest.raises(DataError) as raised:
        load_dataset(folder)

    message = str(raised.value)
    assert f"{filename}, line {line}: " in message
    assert phrase in message


def test_fault_message_says_what_to_do(tmp_path):
    folder = write_dataset(tmp_path / "d", **replace_line("train_ui", 4, "1,3.5"))

    with pytest.raises(DataError, match="Correct or delete this line"):
        load_dataset(folder)


def test_missing_file_named(tmp_path):
    folder = write_dataset(tmp_path / "d")
    (folder / "val_gi.csv").unlink()

    with pytest.raises(DataError, match=r"missing val_gi\.csv"):
        load_dataset(folder)


def test_missing_folder_named(tmp_path):
    with pytest.raises(DataError, match="not found"):
        resolve_data_dir(tmp_path / "nowhere")


def test_file_without_rows_rejected(tmp_path):
    folder = write_dataset(tmp_path / "d", test_ui_tr="user,item\n")

    with pytest.raises(DataError, match=r"test_ui_tr\.csv: the file has no data rows"):
        load_dataset(folder)


# ---------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------

def fail_parse(*args, **kwargs):
    raise AssertionError("the CSV files were parsed although a cache file exists")


def test_second_load_reads_cache(tiny_dir, tmp_path, monkeypatch):
    cache = tmp_path / "own_cache"
    first = load_dataset(tiny_dir, cache_dir=cache)
    cache_files = list((cache / "parsed").glob("*.npz"))
    monkeypatch.setattr(data_module, "_parse_dataset", fail_parse)

    second = load_dataset(tiny_dir, cache_dir=cache)

    assert len(cache_files) == 1
    assert first.checksum in cache_files[0].name
    assert second.checksum == first.checksum
    assert second.source == first.source
    assert (second.member_items != first.member_items).nnz == 0
    assert (second.test_groups.group_members != first.test_groups.group_members).nnz == 0
    assert second.val_users.user_ids.tolist() == [4, 5]
    assert second.test_groups.first_group_id == 4
    assert second.member_items.dtype == np.float32


def test_cache_folder_from_env(tiny_dir, isolated_cache):
    load_dataset(tiny_dir)

    assert len(list((isolated_cache / "parsed").glob("*.npz"))) == 1


def test_changed_csv_invalidates_cache(tiny_dir, isolated_cache):
    before = load_dataset(tiny_dir)
    (tiny_dir / "train_ui.csv").write_text(TINY["train_ui"] + "3,5\n")

    after = load_dataset(tiny_dir)

    assert after.checksum != before.checksum
    assert after.train_user_items[3, 5] == 1
    assert before.train_user_items[3, 5] == 0
    assert len(list((isolated_cache / "parsed").glob("*.npz"))) == 2


def test_data_folder_left_unchanged(tiny_dir):
    before = sorted((path.name, path.stat().st_mtime_ns) for path in tiny_dir.iterdir())

    load_dataset(tiny_dir)
    load_dataset(tiny_dir)

    assert sorted((path.name, path.stat().st_mtime_ns) for path in tiny_dir.iterdir()) == before


def test_corrupt_cache_reparsed(tiny_dir, isolated_cache, caplog):
    load_dataset(tiny_dir)
    [cache_file] = (isolated_cache / "parsed").glob("*.npz")
    cache_file.write_bytes(b"not a zip file")

    with caplog.at_level(logging.WARNING, logger="groupim.data"):
        data = load_dataset(tiny_dir)

    assert data.n_users == 8
    assert any("unreadable dataset cache" in record.getMessage() for record in caplog.records)
    assert cache_file.read_bytes().startswith(b"PK")  # rewritten as an .npz (zip) file


def test_unwritable_cache_only_warns(tiny_dir, tmp_path, caplog):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")

    with caplog.at_level(logging.WARNING, logger="groupim.data"):
        data = load_dataset(tiny_dir, cache_dir=not_a_folder)

    assert data.n_items == 6
    assert any("Could not write the dataset cache" in record.getMessage() for record in caplog.records)


# ---------------------------------------------------------------------------
# Download from a local HTTP server
# ---------------------------------------------------------------------------

class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture
def served_dir(tmp_path) -> Path:
    return write_dataset(tmp_path / "served")


@pytest.fixture
def server_url(served_dir):
    """Base URL of an HTTP server on 127.0.0.1 that serves served_dir."""
    handler = functools.partial(QuietHandler, directory=str(served_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def tiny_sha256(monkeypatch, served_dir) -> dict[str, str]:
    """Point WEEPLACES_SHA256 at the served tiny files and return the table."""
    table = {
        f"{name}.csv": hashlib.sha256((served_dir / f"{name}.csv").read_bytes()).hexdigest() for name in FILES
    }
    monkeypatch.setattr(data_module, "WEEPLACES_SHA256", table)
    return table


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def test_download_then_load(server_url, tiny_sha256, monkeypatch, tmp_path):
    monkeypatch.setenv("GROUPIM_DATA_URL", server_url)
    cache = tmp_path / "download_cache"

    data = load_dataset(None, cache_dir=cache)

    assert data.n_users == 8
    assert data.source == str((cache / "weeplaces").resolve())
    assert sorted(path.name for path in (cache / "weeplaces").iterdir()) == sorted(tiny_sha256)


def test_download_skips_present_files(server_url, tiny_sha256, monkeypatch, tmp_path):
    monkeypatch.setenv("GROUPIM_DATA_URL", server_url)
    cache = tmp_path / "download_cache"
    resolve_data_dir(None, cache_dir=cache)
    monkeypatch.setenv("GROUPIM_DATA_URL", closed_port_url())

    folder = resolve_data_dir(None, cache_dir=cache)

    assert folder == cache / "weeplaces"


def test_download_replaces_corrupt_file(server_url, tiny_sha256, monkeypatch, tmp_path):
    monkeypatch.setenv("GROUPIM_DATA_URL", server_url)
    folder = tmp_path / "download_cache" / "weeplaces"
    folder.mkdir(parents=True)
    (folder / "val_gi.csv").write_text("group,item\n3,2\n")

    resolve_data_dir(None, cache_dir=tmp_path / "download_cache")

    assert (folder / "val_gi.csv").read_text() == TINY["val_gi"]


def test_download_checksum_mismatch(server_url, tiny_sha256, monkeypatch, tmp_path):
    monkeypatch.setenv("GROUPIM_DATA_URL", server_url)
    wrong = "0" * 64
    monkeypatch.setitem(tiny_sha256, "val_gi.csv", wrong)
    actual = hashlib.sha256(TINY["val_gi"].encode()).hexdigest()
    folder = tmp_path / "download_cache" / "weeplaces"

    with pytest.raises(DataError) as raised:
        load_dataset(None, cache_dir=tmp_path / "download_cache")

    message = str(raised.value)
    assert "val_gi.csv" in message
    assert wrong in message
    assert actual in message
    assert not (folder / "val_gi.csv").exists()
    assert not [path.name for path in folder.iterdir() if path.name.endswith(".part")]


def test_download_unreachable_says_where(tiny_sha256, monkeypatch, tmp_path):
    monkeypatch.setenv("GROUPIM_DATA_URL", closed_port_url())
    folder = tmp_path / "download_cache" / "weeplaces"

    with pytest.raises(DataError) as raised:
        load_dataset(None, cache_dir=tmp_path / "download_cache")

    message = str(raised.value)
    assert str(folder) in message
    assert "--data DIR" in message
    assert "train_ui.csv" in message
    assert "group_users.csv" in message


def test_download_missing_on_server(server_url, served_dir, tiny_sha256, monkeypatch, tmp_path):
    monkeypatch.setenv("GROUPIM_DATA_URL", server_url)
    (served_dir / "test_gi.csv").unlink()

    with pytest.raises(DataError, match=r"test_gi\.csv failed \(HTTP 404 "):
        load_dataset(None, cache_dir=tmp_path / "download_cache")


# ---------------------------------------------------------------------------
# write_slice
# ---------------------------------------------------------------------------

def test_slice_of_tiny_loads(tiny_dir, tmp_path):
    out = write_slice(tiny_dir, tmp_path / "slice", 1)

    data = load_dataset(out)

    assert [split.n_groups for split in (data.train_groups, data.val_groups, data.test_groups)] == [1, 1, 1]
    assert [split.first_group_id for split in (data.train_groups, data.val_groups, data.test_groups)] == [0, 1, 2]
    assert data.train_groups.group_members.getnnz() == 2
    assert data.train_groups.group_items.getnnz() == 2
    assert data.test_groups.group_members.getnnz() == 2


def test_slice_keeps_group_contents(tiny_dir, tmp_path):
    source = load_dataset(tiny_dir)
    data = load_dataset(write_slice(tiny_dir, tmp_path / "slice", (3, 1, 2)))

    for old, new in zip(
        (source.train_groups, source.val_groups, source.test_groups),
        (data.train_groups, data.val_groups, data.test_groups),
    ):
        assert new.group_members.getnnz(axis=1).tolist() == old.group_members.getnnz(axis=1).tolist()
        assert new.group_items.getnnz(axis=1).tolist() == old.group_items.getnnz(axis=1).tolist()
    assert data.member_items.nnz == source.member_items.nnz
    assert data.val_users.held_out.nnz == source.val_users.held_out.nnz


def test_slice_rejects_bad_counts(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="groups_per_split"):
        write_slice(tiny_dir, tmp_path / "slice", (1, 0, 1))
    with pytest.raises(ValueError, match="groups_per_split"):
        write_slice(tiny_dir, tmp_path / "slice", (1, 1))


def test_slice_rejects_own_source(tiny_dir):
    with pytest.raises(ValueError, match="overwrite its source"):
        write_slice(tiny_dir, tiny_dir, 1)


# ---------------------------------------------------------------------------
# Real Weeplaces (skipped without the data)
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weeplaces_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("weeplaces_cache")


def test_weeplaces_counts(weeplaces_dir, weeplaces_cache):
    data = load_dataset(weeplaces_dir, cache_dir=weeplaces_cache)

    assert data.n_users == 8643
    assert data.n_items == 25081
    assert data.n_train_users == 6050
    assert [data.train_groups.n_groups, data.val_groups.n_groups, data.test_groups.n_groups] == [15913, 2273, 4547]
    assert [data.train_groups.first_group_id, data.val_groups.first_group_id, data.test_groups.first_group_id] == [
        0, 15913, 18186,
    ]
    assert data.val_users.user_ids[[0, -1]].tolist() == [6050, 6913]
    assert data.test_users.user_ids[[0, -1]].tolist() == [6914, 8642]
    assert data.train_user_items.nnz == 355913
    assert data.member_items.nnz == 355913 + 29082 + 61595
    assert data.val_users.held_out.nnz == 19885
    assert data.test_groups.group_items.nnz == 13846
    assert sum(split.group_members.nnz for split in (data.train_groups, data.val_groups, data.test_groups)) == 65668


def test_weeplaces_users_without_fold_in_kept(weeplaces_dir, weeplaces_cache):
    data = load_dataset(weeplaces_dir, cache_dir=weeplaces_cache)

    assert int((data.val_users.fold_in.getnnz(axis=1) == 0).sum()) == 10
    assert int((data.test_users.fold_in.getnnz(axis=1) == 0).sum()) == 12
    assert int((data.val_users.held_out.getnnz(axis=1) == 0).sum()) == 0


def test_weeplaces_second_load_cached(weeplaces_dir, weeplaces_cache, monkeypatch):
    first = load_dataset(weeplaces_dir, cache_dir=weeplaces_cache)
    monkeypatch.setattr(data_module, "_parse_dataset", fail_parse)

    second = load_dataset(weeplaces_dir, cache_dir=weeplaces_cache)

    assert second.checksum == first.checksum
    assert (second.member_items != first.member_items).nnz == 0


def test_weeplaces_slice_loads(weeplaces_dir, weeplaces_cache, tmp_path):
    source = load_dataset(weeplaces_dir, cache_dir=weeplaces_cache)
    out = write_slice(weeplaces_dir, tmp_path / "slice", (20, 10, 10), cache_dir=weeplaces_cache)

    data = load_dataset(out)

    assert [data.train_groups.n_groups, data.val_groups.n_groups, data.test_groups.n_groups] == [20, 10, 10]
    assert data.n_users < source.n_users
    assert data.n_items < source.n_items
    assert (
        data.test_groups.group_members.getnnz(axis=1).tolist()
        == source.test_groups.group_members[:10].getnnz(axis=1).tolist()
    )
    assert (
        data.train_groups.group_items.getnnz(axis=1).tolist()
        == source.train_groups.group_items[:20].getnnz(axis=1).tolist()
    )


def test_weeplaces_files_match_sha256(weeplaces_dir):
    for filename, expected in data_module.WEEPLACES_SHA256.items():
        assert hashlib.sha256((weeplaces_dir / filename).read_bytes()).hexdigest() == expected, filename
