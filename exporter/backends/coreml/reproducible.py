"""Make a saved .mlpackage the same bytes every time the same model is converted.

coremltools writes three things that change from one save to the next (found by exporting
one tiny model twice and comparing every file's sha256; docs/ci.md):
- ``Manifest.json`` names each item by a random uuid4; here each id is a uuid5 of the
  item's path, and the JSON is written with sorted keys;
- ``model.mlmodel``'s metadata map is serialised in the process's hash order; here the
  spec is serialised with protobuf's deterministic (sorted-map) mode;
- the metadata's ``conversion_date``, the day of the export; it is removed (the artifact's
  export.json records when it was made).
The weights file is already deterministic. Core ML reads item ids as opaque strings, so the
package loads as before.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from exporter.errors import require

CONVERSION_DATE_KEY = "com.github.apple.coremltools.conversion_date"
# A fixed namespace so an item's id depends on its path alone.
ITEM_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://recgpt-export/coreml-package-items")


def normalise_package(package: Path) -> None:
    """Rewrite ``package``'s Manifest.json and root spec in their deterministic form."""
    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    renamed = {old: str(uuid.uuid5(ITEM_NAMESPACE, entry["path"]))
               for old, entry in manifest["itemInfoEntries"].items()}
    root_path = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]["path"]
    manifest["itemInfoEntries"] = {renamed[old]: entry for old, entry in manifest["itemInfoEntries"].items()}
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n", encoding="utf-8")

    model_pb2 = require("coremltools.proto.Model_pb2", "coreml")
    spec_path = package / "Data" / root_path
    spec = model_pb2.Model()
    spec.ParseFromString(spec_path.read_bytes())
    spec.description.metadata.userDefined.pop(CONVERSION_DATE_KEY, None)
    spec_path.write_bytes(spec.SerializeToString(deterministic=True))
