"""The trust boundary for model folders: their own Python code runs only with ``--trust-remote-code``.

Hugging Face folders may name classes in ``.py`` files beside the weights (``auto_map`` in
config.json or tokenizer_config.json). Without the flag transformers would ask on a terminal and
run the code on "y"; we refuse first, in one line, and always pass ``trust_remote_code``
explicitly, so no loader ever prompts. Stdlib only (the runtime's tokenizer check uses it too).
"""

from __future__ import annotations

import json
from pathlib import Path

# the files of a model folder that can name custom code
CODE_REFERENCING_FILES = ("config.json", "tokenizer_config.json", "processor_config.json",
                          "preprocessor_config.json", "generation_config.json")


class RemoteCodeRefused(ValueError):
    """The folder names custom Python code and ``--trust-remote-code`` was not given."""


def custom_code_references(folder: Path) -> list[tuple[Path, str]]:
    """(file, class reference) for every ``auto_map`` entry in the folder's config files."""
    found = []
    for name in CODE_REFERENCING_FILES:
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            # not our concern here: the loader that reads it names the corruption
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if not isinstance(auto_map, dict):
            continue
        for value in auto_map.values():
            for ref in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(ref, str):
                    found.append((path, ref))
    return found


def check_remote_code(folder: Path, trust_remote_code: bool) -> None:
    """RemoteCodeRefused (one line, naming the file and the class) unless the folder is code-free or trusted."""
    if trust_remote_code:
        return
    refs = custom_code_references(folder)
    if refs:
        path, ref = refs[0]
        module = ref.split("--")[-1].rsplit(".", 1)[0]
        more = f" (+{len(refs) - 1} more)" if len(refs) > 1 else ""
        raise RemoteCodeRefused(f"{path} names custom code {ref!r} (from {module}.py){more}; it runs only with "
                                "--trust-remote-code, pass it if you trust this folder")
