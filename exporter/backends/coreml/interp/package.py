"""The .mlpackage folder: Manifest.json names the model spec and the weights folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from exporter.backends.coreml.interp import schema
from exporter.errors import ArtifactError


@dataclass
class Package:
    path: Path
    spec: object  # Model_pb2.Model
    weights_dir: Path

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.spec.description.metadata.userDefined)

    def weight_file(self, file_name: str) -> Path:
        prefix = "@model_path/weights/"
        if not file_name.startswith(prefix):
            raise ArtifactError(f"{self.path}: weight file {file_name!r} is not under @model_path/weights/")
        return self.weights_dir / file_name[len(prefix):]


def read_package(path: str | Path) -> Package:
    path = Path(path)
    manifest_path = path / "Manifest.json"
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} is not an .mlpackage (no Manifest.json)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    items = manifest.get("itemInfoEntries", {})
    root = items.get(manifest.get("rootModelIdentifier", ""))
    if root is None:
        raise ArtifactError(f"{manifest_path}: rootModelIdentifier names no item")
    data = path / "Data"
    spec_path = data / root["path"]
    weights = next((data / item["path"] for item in items.values() if item.get("name") == "weights"),
                   spec_path.parent / "weights")
    model = schema.model_pb2().Model()
    try:
        model.ParseFromString(spec_path.read_bytes())
    except Exception as exc:  # protobuf's DecodeError
        raise ArtifactError(f"{spec_path} is not a Core ML model spec ({exc})") from exc
    if model.WhichOneof("Type") != "mlProgram":
        raise ArtifactError(f"{spec_path}: a {model.WhichOneof('Type')} model, not an ML program")
    return Package(path=path, spec=model, weights_dir=weights)
