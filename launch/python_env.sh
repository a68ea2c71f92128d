# Sourced by install.sh, quickstart.sh and test.sh: picks the Python everything installs into and runs with,
# and exports it as ZO2_PY.
#
# Order: ZO2_PYTHON when set; the active virtual environment ($VIRTUAL_ENV) or conda environment ($CONDA_PREFIX);
# otherwise the project's own venv, .venv/, made on first use from `python3` (else `python`) on PATH. A system
# interpreter is never installed into: Debian's and Ubuntu's are externally managed (PEP 668), and
# --break-system-packages is never used.

zo2_say() { echo "$(basename "$0"): $*" >&2; }

# Succeeds when "$1" runs and is Python >= 3.10.
zo2_python_ok() {
  "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null
}

# Succeeds when "$1" is marked externally managed (PEP 668): pip refuses to install into it.
zo2_externally_managed() {
  "$1" -c 'import os, sys, sysconfig
sys.exit(0 if sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)' 2>/dev/null
}

# Makes .venv/ from the base interpreter "$1"; installs the distribution's venv package where it is missing.
zo2_make_venv() {
  local base="$1" venv_pkg
  if ! "$base" -c 'import venv, ensurepip' 2>/dev/null; then
    venv_pkg="python$("$base" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')-venv"
    if command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then
      zo2_say "installing $venv_pkg with apt-get (as root) so that $base can make a virtual environment"
      local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
      $sudo apt-get update -qq && $sudo apt-get install -y -qq "$venv_pkg" >/dev/null
    else
      zo2_say "$base cannot make a virtual environment: install the package $venv_pkg (e.g. sudo apt-get install $venv_pkg), or activate a virtual environment of your own, then run this again"
      return 1
    fi
  fi
  "$base" -m venv "$ZO2_ROOT/.venv"
}

# Sets ZO2_PY (and ZO2_PY_WHERE, one line saying where things go). With "create", makes .venv/ when needed.
zo2_resolve_python() {
  local mode="${1:-}" base=""
  ZO2_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  if [ -n "${ZO2_PYTHON:-}" ]; then
    ZO2_PY="$ZO2_PYTHON"; ZO2_PY_WHERE="the interpreter named by ZO2_PYTHON ($ZO2_PY)"
  elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    ZO2_PY="$VIRTUAL_ENV/bin/python"; ZO2_PY_WHERE="the active virtual environment $VIRTUAL_ENV"
  elif [ -n "${CONDA_PREFIX:-}" ] && [ -x "$CONDA_PREFIX/bin/python" ]; then
    ZO2_PY="$CONDA_PREFIX/bin/python"; ZO2_PY_WHERE="the active conda environment $CONDA_PREFIX"
  else
    ZO2_PY="$ZO2_ROOT/.venv/bin/python"
    ZO2_PY_WHERE="the project's virtual environment $ZO2_ROOT/.venv (use it with: source .venv/bin/activate)"
    if ! [ -x "$ZO2_PY" ]; then
      [ "$mode" = create ] || { zo2_say "no environment yet: run bash launch/install.sh first"; return 1; }
      for candidate in python3 python; do
        if command -v "$candidate" >/dev/null && zo2_python_ok "$(command -v "$candidate")"; then
          base="$(command -v "$candidate")"; break
        fi
      done
      [ -n "$base" ] || { zo2_say "no Python >= 3.10 found as python3 or python on PATH; install one (e.g. apt-get install python3 python3-venv)"; return 1; }
      zo2_make_venv "$base" || return 1
      ZO2_PY_WHERE="$ZO2_PY_WHERE, made from $base"
    fi
  fi
  zo2_python_ok "$ZO2_PY" || { zo2_say "$ZO2_PY is not a Python >= 3.10"; return 1; }
  if zo2_externally_managed "$ZO2_PY"; then
    zo2_say "$ZO2_PY is externally managed (PEP 668) and is not installed into; unset ZO2_PYTHON to use the project's .venv"
    return 1
  fi
  export ZO2_PY ZO2_PY_WHERE
}
