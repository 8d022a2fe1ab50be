"""JSON Schema files for producers in other languages, generated from the pydantic models.

The files in `topics/schemas/` are committed; a test fails when they drift from the models.
Regenerate with `vlm4rec topics schemas`.
"""

from __future__ import annotations

import json
from pathlib import Path

from topics.events import EVENT_MODELS, SCHEMA_VERSION

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"


def schema_documents() -> dict[str, str]:
    """File name -> JSON text of every event schema."""
    docs = {}
    for name, model in EVENT_MODELS.items():
        schema = model.model_json_schema(mode="validation")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"vlm4rec/{name}.v{SCHEMA_VERSION}.json"
        docs[f"{name}.v{SCHEMA_VERSION}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return docs


def write_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, text in schema_documents().items():
        path = directory / filename
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
