"""Exports are relocatable: built in one folder, copied elsewhere with the original hidden,
every file an export references resolves the way its framework resolves it, and the data
version does not depend on the folder the export was built in.

Two real builds (2 TabMWP problems, real OCR, grounded teacher, the offline student's
processor in pre-flight) in two folders of different depth; every exporter.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from mmat_assets.assets import build_definitions
from mmat_assets.config import load_config
from tests.built_project import materialize
from tests.conftest import REPO, TABMWP, write_project
from tests.test_student import build_test_student, student_cache

pytest.importorskip("transformers")
pytest.importorskip("datasets")

N_PROBLEMS = 2
EXPORTERS = ("ms_swift", "sharegpt", "internvl", "hf_datasets")
TARGETS = ["*rr_samples", "*orr_samples", "student_base", "group:export"]
#: OCR is what the grounded teacher reads TabMWP tables with; the other tools only cost time here.
TOOLS = {"label_bbox": {"enabled": False}, "face_detection": {"enabled": False}, "image_caption": {"enabled": False}}


@dataclass
class Build:
    root: Path  # the project folder the export was built in
    manifests: dict[str, dict[str, Any]]  # exporter -> manifest.json as written in its folder
    dagster_versions: dict[str, str]


def _build(root: Path, problems: dict[str, Any], student: Path) -> Build:
    data = root / "tabmwp"
    (data / "tables").mkdir(parents=True)
    (data / "problems.json").write_text(json.dumps(problems))
    for pid in problems:
        shutil.copy(TABMWP / "tables" / f"{pid}.png", data / "tables")
    export = {"exporters": list(EXPORTERS), "formats": ["rr", "orr"], "max_length": 1024, "student": str(student)}
    path = write_project(root, {"tabmwp": {"plugin": "tabmwp", "options": {"path": "tabmwp"}}}, shards=2,
                         tools=TOOLS, export=export)
    defs = build_definitions(load_config(path), "local")
    (root / "dagster_home").mkdir()
    instance = dg.DagsterInstance.local_temp(str(root / "dagster_home"))
    materialize(defs, instance, TARGETS)
    manifests, versions = {}, {}
    for name in EXPORTERS:
        manifests[name] = json.loads((_export(root, name) / "manifest.json").read_text(encoding="utf-8"))
        rec = instance.get_latest_data_version_record(dg.AssetKey(["exports", name]), False)
        versions[name] = rec.asset_materialization.tags["dagster/data_version"]
    return Build(root, manifests, versions)


def _export(root: Path, name: str) -> Path:
    return root / "store" / "exports" / name


#: Every test here reads the exported files of two real builds of one project.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def student_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_student(student_cache(request, tmp_path_factory))


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory, student_dir: Path) -> tuple[Build, Build]:
    problems = dict(list(json.loads((TABMWP / "problems.json").read_text()).items())[:N_PROBLEMS])
    base = tmp_path_factory.mktemp("relocate")
    a = _build(base / "a", problems, student_dir)
    return a, _build(base / "checkout-b" / "deeper" / "b", problems, student_dir)


@pytest.fixture(scope="module")
def moved(builds: tuple[Build, Build], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build A's exports copied to another folder; the whole of build A then renamed away."""
    a = builds[0]
    dest = tmp_path_factory.mktemp("other-machine")
    copies = {name: Path(shutil.copytree(_export(a.root, name), dest / name)) for name in EXPORTERS}
    a.root.rename(a.root.with_name(a.root.name + "-hidden"))
    return copies


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory that holds none of the export's files (frameworks resolve against it)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _is_relative(path: str) -> bool:
    return not Path(path).is_absolute() and not path.startswith("~")


def _swift_resolve(path: str, root_image_dir: Path) -> Path:
    """ms-swift's ``load_file``: an existing path as is, else joined to ``ROOT_IMAGE_DIR``."""
    return Path(path) if os.path.exists(path) else root_image_dir / path


def test_the_data_version_does_not_depend_on_the_build_folder(builds: tuple[Build, Build]) -> None:
    a, b = builds
    for name in EXPORTERS:
        assert a.manifests[name]["rows"] == b.manifests[name]["rows"] and sum(a.manifests[name]["rows"].values()) > 0
        assert a.manifests[name]["data_version"] == b.manifests[name]["data_version"], name
        assert a.dagster_versions[name] == b.dagster_versions[name] == a.manifests[name]["data_version"], name
    assert len({a.manifests[n]["data_version"] for n in EXPORTERS}) == len(EXPORTERS)  # formats differ


def test_no_exported_file_names_a_path_of_the_build_machine(builds: tuple[Build, Build], moved: dict[str, Path],
                                                           student_dir: Path) -> None:
    local = {str(builds[0].root).encode(), str(builds[1].root).encode(), str(student_dir).encode(),
             str(REPO).encode()}
    for name, folder in moved.items():
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert {"manifest.json", "sample_ids.parquet"} <= {p.name for p in files}, name
        for p in files:
            data = p.read_bytes()
            assert not [s for s in local if s in data], f"{name}/{p.relative_to(folder)} names a local path"
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        for rel in [*manifest["files"].values(), manifest["sample_ids"]]:
            assert _is_relative(rel) and (folder / rel).is_file(), (name, rel)


def test_ms_swift_rows_resolve_against_root_image_dir_and_encode(moved: dict[str, Path], elsewhere: Path,
                                                                 student_dir: Path) -> None:
    from transformers import AutoProcessor

    from mmat_plugins.trainers_hf_lora import encode_record

    folder = moved["ms_swift"]
    processor = AutoProcessor.from_pretrained(str(student_dir))
    rows = [json.loads(line) for fmt in ("rr", "orr")
            for line in (folder / f"{fmt}.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows and all(r["images"] for r in rows)
    for row in rows:
        assert all(_is_relative(p) and _swift_resolve(p, folder).is_file() for p in row["images"]), row["images"]
        resolved = {**row, "images": [str(_swift_resolve(p, folder)) for p in row["images"]]}
        d = encode_record(processor, resolved, 1024)
        assert d["n_images"] == d["n_image_placeholders"] == len(row["images"]) and d["assistant_tokens"] > 0


def test_llama_factory_finds_files_and_images_under_media_dir(moved: dict[str, Path], elsewhere: Path) -> None:
    folder = moved["sharegpt"]  # dataset_dir = media_dir = the export folder
    info = json.loads((folder / "dataset_info.json").read_text(encoding="utf-8"))
    assert set(info) == {"mmat_rr", "mmat_orr"}
    for entry in info.values():
        assert _is_relative(entry["file_name"])
        convs = json.loads((folder / entry["file_name"]).read_text(encoding="utf-8"))
        assert convs and all(c["images"] for c in convs)
        for conv in convs:
            assert all(_is_relative(p) and (folder / p).is_file() for p in conv["images"]), conv["images"]


def test_internvl_meta_resolves_relative_to_its_own_folder(moved: dict[str, Path], elsewhere: Path) -> None:
    folder = moved["internvl"]
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    assert set(meta) == {"mmat_rr", "mmat_orr"}
    for entry in meta.values():
        assert _is_relative(entry["root"]) and _is_relative(entry["annotation"]), entry
        root, annotation = folder / entry["root"], folder / entry["annotation"]
        rows = [json.loads(line) for line in annotation.read_text(encoding="utf-8").splitlines()]
        assert len(rows) == entry["length"] > 0
        for row in rows:
            images = row["image"] if isinstance(row["image"], list) else [row["image"]]
            assert all(_is_relative(p) and (root / p).is_file() for p in images), images


def test_hf_folder_loads_without_a_config_name_and_its_card_parses(moved: dict[str, Path], elsewhere: Path,
                                                                  builds: tuple[Build, Build]) -> None:
    import datasets
    from huggingface_hub import DatasetCard

    folder = moved["hf_datasets"]
    manifest = builds[1].manifests["hf_datasets"]
    ds = datasets.load_dataset(str(folder), split="train", cache_dir=str(elsewhere / "hf-cache"))
    assert len(ds) == manifest["rows"]["rr"] and ds[0]["images"][0].size[0] > 0
    card = DatasetCard.load(folder / "README.md")
    assert card.data.license == "cc-by-nc-sa-4.0" and card.data.pretty_name
    assert [c["config_name"] for c in card.data.configs] == ["rr", "orr"]
    assert [c.get("default", False) for c in card.data.configs] == [True, False]
    assert manifest["data_version"] in card.text and "version: unknown" not in card.text
    assert "Lu" in card.text and "2209.14610" in card.text  # TabMWP's citation



def test_training_data_resolves_its_images_like_the_export(moved: dict[str, Path], tmp_path: Path) -> None:
    from mmat_assets.assets.training import _link_train_file

    train = tmp_path / "train-data" / "train.jsonl"  # where tuned_model hands the trainer its data
    train.parent.mkdir()
    for _ in range(2):  # a rebuild replaces what the last one linked
        _link_train_file(moved["ms_swift"] / "rr.jsonl", train)
    rows = [json.loads(line) for line in train.read_text(encoding="utf-8").splitlines()]
    assert rows and all((train.parent / p).is_file() for r in rows for p in r["images"])
