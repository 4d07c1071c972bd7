#!/usr/bin/env bash
# Creates .venv and installs the project into it; idempotent (skips when pyproject and constraints are unchanged).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"
stamp="$venv/.flywheel-installed"
want="$(cat "$root/pyproject.toml" "$root/.ci/constraints-cpu.txt" | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# CPU machines: the constraints keep torch on the CPU build (any other spec downloads gigabytes of CUDA).
# GPU machines: set FLYWHEEL_CONSTRAINTS= (empty) to keep the CUDA torch you install yourself.
constraints="${FLYWHEEL_CONSTRAINTS-$root/.ci/constraints-cpu.txt}"
"$venv/bin/python" -m pip install --quiet ${constraints:+-c "$constraints"} -e "$root[dev]"
echo "$want" > "$stamp"
