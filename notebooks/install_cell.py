# Install llmft into THIS kernel (no restart needed). Same cell in every notebook: notebooks/install_cell.py.
import glob, importlib, importlib.util, os, subprocess, sys

LLMFT_REPO = os.environ.get("LLMFT_REPO", "https://github.com/llmft/llmft")   # or your fork, or a local clone
LLMFT_WHEELHOUSE = os.environ.get("LLMFT_WHEELHOUSE", "")   # Kaggle, internet off: the wheelhouse dataset's folder


def llmft_install_step(what, command, retry):
    print(f"[llmft install] {what}: {' '.join(command)}", flush=True)
    try:  # output streamed line by line, so it shows in every notebook front end
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHON": sys.executable}) as process:
            for line in process.stdout:
                print(line, end="", flush=True)
        failure = f"exit code {process.returncode}" if process.returncode else None
    except OSError as err:  # e.g. git or bash missing
        failure = str(err)
    if failure:
        raise RuntimeError(f"llmft install stopped: step '{what}' failed ({failure}; output above). {retry}") from None

if importlib.util.find_spec("llmft") is None:
    if LLMFT_WHEELHOUSE:
        if not os.path.isdir(LLMFT_WHEELHOUSE):  # Kaggle may mount a dataset one level deeper
            LLMFT_WHEELHOUSE = next(iter(glob.glob(f"/kaggle/input/**/{os.path.basename(LLMFT_WHEELHOUSE)}",
                                                   recursive=True)), LLMFT_WHEELHOUSE)
        pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", LLMFT_WHEELHOUSE]
        retry = (f"Check that the wheelhouse dataset is attached at {LLMFT_WHEELHOUSE} and was built for this "
                 "image's torch (kaggle/build_wheelhouse.sh --torch), then re-run this cell.")
        llmft_install_step("install the pinned stack from the wheelhouse",
                           pip + ["-r", os.path.join(LLMFT_WHEELHOUSE, "requirements-kaggle.txt")], retry)
        llmft_install_step("install unsloth and llmft from the wheelhouse",
                           pip + ["--no-deps", "-r", os.path.join(LLMFT_WHEELHOUSE, "requirements-unsloth.txt"),
                                  "llmft"], retry)
    else:
        if not os.path.isdir("llmft-src/.git"):
            llmft_install_step("clone the repository", ["git", "clone", "--depth", "1", LLMFT_REPO, "llmft-src"],
                               f"Check the internet connection (Kaggle: Settings > Internet on) and LLMFT_REPO="
                               f"{LLMFT_REPO}, delete a partial llmft-src/ if there is one, then re-run this cell.")
        llmft_install_step("install the pinned stack", ["bash", "llmft-src/scripts/install.sh"],
                           "Fix the cause shown above and re-run this cell (the clone in llmft-src/ is reused); if "
                           "the torch install is broken, restart the runtime first.")
    importlib.invalidate_caches()
    if importlib.util.find_spec("llmft") is None:
        raise RuntimeError("llmft install stopped: the steps succeeded but this kernel cannot find llmft; restart "
                           "the kernel and run the notebook again.")
else:  # install.sh installs llmft last, after its preflight passed: an llmft here is a complete install
    print(f"[llmft install] llmft is already installed ({os.path.dirname(importlib.util.find_spec('llmft').origin)}): "
          "nothing to do. To install again (another LLMFT_REPO, a newer commit): %pip uninstall -y llmft, then re-run "
          "this cell.")
