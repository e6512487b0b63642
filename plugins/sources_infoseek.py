"""InfoSeek: information-seeking questions about visual entities (OVEN images).

Public format of the InfoSeek release (``infoseek_train.jsonl``, ``infoseek_val.jsonl``,
...): one JSON object per line, ``{"data_id", "image_id", "question", "answer": [...],
"answer_eval": [...], "data_split"}``, with ``entity_id``/``entity_text`` in the with-KB
files. ``answer_eval`` entries are strings or, for numeric answers,
``{"wikidata": value, "range": [low, high]}``. Images are the OVEN files named by
``image_id``. Licence Apache-2.0 (annotations; images keep their own terms).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from pydantic import Field, field_validator

from mmat_assets.contracts import BadRow, ImageInput, SourceRow
from mmat_assets.hookspecs import Register, hookimpl
from mmat_assets.toolkit.jsonl import iter_jsonl_objects, line_id, raw_excerpt
from mmat_assets.toolkit.sources import FileSource, FileSourceOptions, guarded_records

REQUIRED = ("image_id", "question", "answer")
#: Keys an entity file may use: InfoSeek's own (entity_id/entity_text) or Wiki6M's.
ENTITY_ID_KEYS = ("entity_id", "wikidata_id", "id")
ENTITY_NAME_KEYS = ("entity_text", "wikipedia_title", "name", "title")


class InfoSeekOptions(FileSourceOptions):
    path: str = Field(description="An InfoSeek JSONL file (infoseek_train.jsonl, infoseek_val.jsonl, ...).")
    image_root: str = Field(description="Directory holding the OVEN images.")
    image_pattern: str = Field(
        default="{image_id}.jpg",
        description="Image path under image_root; '{image_id}' is replaced by the row's image_id.",
    )
    entities: str | None = Field(
        default=None,
        description=("Optional JSONL of entity id -> name (keys entity_id/entity_text or "
                     "wikidata_id/wikipedia_title)."),
    )

    @field_validator("image_pattern")
    @classmethod
    def _pattern_names_image_id(cls, value: str) -> str:
        try:
            filled = value.format(image_id="\0")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"only the field '{{image_id}}' may appear in {value!r}: {exc}") from None
        if "\0" not in filled:
            raise ValueError(f"image_pattern {value!r} must contain '{{image_id}}'")
        return value


class InfoSeekSource(FileSource[InfoSeekOptions]):
    """InfoSeek questions: gold answer is the first answer; all answers and the entity in meta."""

    name = "infoseek"
    version = "1.0.0"
    license = "Apache-2.0"
    description = "InfoSeek JSONL (knowledge-seeking VQA over OVEN images)."

    def read(self) -> Iterator[SourceRow | BadRow]:
        entities = self._entities()
        yield from guarded_records(iter_jsonl_objects(self.file), lambda n, obj: self._row(n, obj, entities), line_id)

    def _entities(self) -> dict[str, str]:
        """Entity id -> name from the optional mapping file (its bad lines are skipped)."""
        if not self.options.entities:
            return {}
        names: dict[str, str] = {}
        for item in iter_jsonl_objects(self.resolve_path(self.options.entities)):
            if isinstance(item, BadRow):
                continue  # a name is a nicety; a bad mapping line must not cost questions
            key = _first(item[1], ENTITY_ID_KEYS)
            name = _first(item[1], ENTITY_NAME_KEYS)
            if key is not None and name is not None:
                names.setdefault(str(key), str(name))
        return names

    def _row(self, n: int, obj: dict[str, Any], entities: dict[str, str]) -> SourceRow | BadRow:
        row_id = str(obj["data_id"]) if obj.get("data_id") is not None else line_id(n)
        missing = [k for k in REQUIRED if k not in obj]
        problem = f"missing field(s) {missing}" if missing else _type_problem(obj)
        if problem:
            return BadRow(row_id, problem, raw_excerpt(json.dumps(obj, ensure_ascii=False)))
        answers = _answers(obj["answer"])
        entity_id = obj.get("entity_id")
        entity = obj.get("entity_text") or (entities.get(str(entity_id)) if entity_id else None)
        image_id = str(obj["image_id"])
        return SourceRow(
            row_id=row_id,
            question=str(obj["question"] or ""),
            answer=answers[0] if answers else "",
            images=[ImageInput(path=self.options.image_pattern.format(image_id=image_id))],
            subset=str(obj.get("data_split") or "infoseek"),
            meta={"answers": answers, "answer_eval": obj.get("answer_eval"), "image_id": image_id,
                  "entity_id": entity_id, "entity": entity, "data_split": obj.get("data_split")},
        )


def _type_problem(obj: dict[str, Any]) -> str | None:
    if not isinstance(obj["image_id"], (str, int)) or isinstance(obj["image_id"], bool):
        return "'image_id' is not a string"
    if obj["question"] is not None and not isinstance(obj["question"], str):
        return "'question' is not a string"
    if not isinstance(obj["answer"], (list, str, int, float)):
        return "'answer' is not a list of strings"
    return None


def _answers(value: Any) -> list[str]:
    """All answers as text (a bare string counts as one answer)."""
    items = value if isinstance(value, list) else [value]
    return [str(a).strip() for a in items if a is not None and str(a).strip()]


def _first(obj: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((obj[k] for k in keys if obj.get(k) is not None), None)


@hookimpl
def register_sources(register: Register) -> None:
    register(InfoSeekSource)
