"""Pre-warmed generic runtimes: the processes of a node's pool (runtime/local/pool.py is the gateway's side).

    python -m sllm_faas.runtime.server.zygote --dir POOL_DIR --reaper PID

The zygote imports torch and the runtime once and warms what can be warmed without a model, on one thread
(no OpenMP pool exists before a fork). Then it reads commands on stdin, one per line:

    member ID   ->  "member ID PID" on stdout, once the member is ours to assign
    prepare ENV ->  "prepared new|kept SECONDS DIR" (ENV: an instance's environment, one JSON object)

`prepare` preloads, for the members forked after it, what a start of that environment's model would read
itself: its tokenizer (0.1 s of SmolLM2's start), kept by runtime/model/tokenizer.py and used when the
files are the very same. The pool sends it for each model a member was assigned (runtime/local/pool.py),
so the next start of a function on this node finds it ready. The first forward needs no such warming:
it costs what later ones do (benchmarks/README.md).

A member is made by a double fork, so that it is re-parented to the gateway (`--reaper`, which made itself
a child subreaper) rather than staying the zygote's child: the gateway waits for it, stops its process
group and it dies with the gateway (PR_SET_PDEATHSIG, set after the re-parenting), while a dead zygote
takes no serving instance with it. Without CUDA the member is the forked grandchild itself (it shares the
zygote's imported pages copy-on-write); with CUDA, which does not survive a fork, the grandchild execs a
fresh interpreter (`--member`) that imports, initialises CUDA and then waits the same way.

A waiting member listens on POOL_DIR/ID.sock (renamed into place once listening; the folder is 0700).
Its one assignment is a JSON line: the instance's environment, build folder, log file, port and the
gateway's clock at assignment. It answers "ok", and becomes the instance: stdout and stderr go to the log,
the environment is replaced, and the runtime's gunicorn worker serves the function in this very process
(no master, no fork: CUDA stays usable). SLLM_POOL_ASSIGNED_AT tells the cold start to time itself from
the assignment (runtime/server/startup.py).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import signal
import socket
import sys
import time
from pathlib import Path

_PR_SET_PDEATHSIG = 1
ASSIGN_LIMIT = 1 << 20   # bytes of one assignment line


def warm(cuda: bool) -> None:
    """Import what an instance needs and run each kind of operation a decoder step uses once on tiny
    tensors, single-threaded (torch's thread pools must not exist before a fork)."""
    import flask  # noqa: F401
    import gunicorn.app.wsgiapp  # noqa: F401
    import redis  # noqa: F401
    import requests  # noqa: F401
    import torch
    import torch.nn.functional as F  # noqa: N812

    import sllm_faas.common.http_server  # noqa: F401
    import sllm_faas.runtime.loader  # noqa: F401
    import sllm_faas.runtime.model.engine  # noqa: F401
    import sllm_faas.runtime.model.fallback  # noqa: F401
    import sllm_faas.runtime.model.llama  # noqa: F401
    import sllm_faas.runtime.model.tokenizer  # noqa: F401
    import sllm_faas.runtime.node_loader.client  # noqa: F401
    import sllm_faas.runtime.server.app  # noqa: F401
    import sllm_faas.runtime.server.registration  # noqa: F401

    torch.set_num_threads(1)
    device = "cuda" if cuda else "cpu"
    with torch.inference_mode():
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(1, 4, 64, dtype=dtype, device=device)
            weight = torch.randn(64, 64, dtype=dtype, device=device)
            h = F.silu(F.linear(x, weight)) * x
            h = h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(dtype)
            q = h.view(1, 4, 2, 32).transpose(1, 2)
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
            logits = F.embedding(torch.tensor([[1, 2]], device=device), weight) @ weight.T
            torch.argmax(torch.softmax(logits.float(), -1), -1)
    if cuda:
        torch.cuda.synchronize()


def _die_with_parent(expected_parent: int) -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != expected_parent:   # the parent died before the signal was armed
        os._exit(1)


def listen(path: Path) -> socket.socket:
    """A Unix socket at `path`, listening before the name appears (the gateway may connect at once)."""
    temporary = path.with_name(path.name + ".partial")
    temporary.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(temporary))
    server.listen(1)
    os.rename(temporary, path)
    return server


def wait_assignment(path: Path) -> dict:
    """Block until the gateway assigns this member; the first well-formed assignment wins."""
    server = listen(path)
    while True:
        connection, _ = server.accept()
        with connection:
            connection.settimeout(10)
            data = b""
            try:
                while not data.endswith(b"\n") and len(data) < ASSIGN_LIMIT:
                    chunk = connection.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                assignment = json.loads(data)
                if not isinstance(assignment, dict) or not {"env", "cwd", "log", "port", "assigned_at"} <= set(
                        assignment):
                    raise ValueError("not an assignment")
                connection.sendall(b"ok\n")
            except (OSError, ValueError):
                continue
        server.close()
        path.unlink(missing_ok=True)
        return assignment


def become_instance(assignment: dict) -> None:
    """Serve the assigned function in this process until stopped; never returns."""
    log = os.open(assignment["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    os.environ.clear()
    os.environ.update(assignment["env"])
    os.environ["SLLM_POOL_ASSIGNED_AT"] = repr(float(assignment["assigned_at"]))
    os.environ["PORT"] = str(int(assignment["port"]))
    os.environ["SLLM_HOST"] = "127.0.0.1"
    os.chdir(assignment["cwd"])
    sys.path.insert(0, os.getcwd())
    code = 0
    try:
        serve_in_process(assignment.get("app", "index:app"))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)   # atexit handlers ran in serve_in_process's finally (lease and slot given back)


def serve_in_process(app: str) -> None:
    """The runtime's gunicorn worker (sllm_faas.common.http_server.Worker, the runtime's gunicorn settings) run in this
    process: what gunicorn's arbiter does in a freshly forked worker, without the arbiter and its fork. The
    worker exits when its parent (the gateway) changes, on SIGTERM (gracefully) or SIGQUIT/SIGINT."""
    import atexit

    from gunicorn import sock
    from gunicorn.app.wsgiapp import WSGIApplication

    from sllm_faas.common.http_server import WORKER_CLASS

    sys.argv = ["gunicorn", "--config", "python:sllm_faas.runtime.server.gunicorn_conf", "--worker-class", WORKER_CLASS,
                app]
    application = WSGIApplication("%(prog)s [OPTIONS] [APP_MODULE]")
    cfg = application.cfg
    logger = cfg.logger_class(cfg)
    listeners = sock.create_sockets(cfg, logger)
    worker = cfg.worker_class(0, os.getppid(), listeners, application, cfg.timeout / 2.0, cfg, logger)
    worker.pid = os.getpid()
    try:
        worker.init_process()
    finally:
        worker.tmp.close()
        atexit._run_exitfuncs()


def member(path: Path, reaper: int, exec_cuda: bool) -> int:
    """In the zygote: make one member (double fork); returns its pid once it is re-parented to `reaper`."""
    read_end, write_end = os.pipe()
    intermediate = os.fork()
    if intermediate == 0:
        try:
            os.close(read_end)
            intermediate_pid = os.getpid()   # read before the fork: the intermediate may be gone at once
            grandchild = os.fork()
            if grandchild:
                os.write(write_end, f"{grandchild}\n".encode())
                os._exit(0)
            os.close(write_end)
            os.setsid()   # its own process group: the gateway stops it as it stops any instance
            while os.getppid() == intermediate_pid:   # until the intermediate has exited
                time.sleep(0.0005)
            _die_with_parent(reaper)   # exits unless re-parented to the reaper (the gateway)
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(null, 1)   # the zygote's command pipes are not ours
            os.close(null)
            if exec_cuda:
                os.execv(sys.executable, [sys.executable, "-m", "sllm_faas.runtime.server.zygote",
                                          "--member", str(path), "--reaper", str(reaper)])
            random.seed()   # the zygote's random state must not be shared by its members
            become_instance(wait_assignment(path))
        except BaseException:
            import traceback

            traceback.print_exc()
        os._exit(1)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        line = pipe.readline()
    os.waitpid(intermediate, 0)
    if not line.strip():
        raise RuntimeError("the intermediate process died before forking a member")
    return int(line)


def prepare(env: dict[str, str]) -> tuple[Path, bool]:
    """Preload the tokenizer of the model an instance with environment `env` serves: (its directory, where the
    node loader holds it when the environment names one; whether it was not preloaded yet)."""
    from sllm_faas.common.names import validate_model_name
    from sllm_faas.runtime.checkpoint.format import read_manifest
    from sllm_faas.runtime.model.tokenizer import Tokenizer
    from sllm_faas.runtime.server.settings import Settings
    from sllm_faas.runtime.server.startup import resolve_model_dir

    settings = Settings.resolve(env=env)
    if settings.loader_socket:
        from sllm_faas.runtime.node_loader.client import LoaderClient

        directory = Path(LoaderClient(settings.loader_socket, timeout=5.0).where(
            validate_model_name(settings.model))["path"])
    else:
        directory = resolve_model_dir(settings.model, settings.model_store)
    read_manifest(directory)   # a folder that is no checkpoint is refused by name
    return directory, Tokenizer.preload(directory, settings.chat_template)


def answer_prepare(line: str) -> str:
    """The zygote's answer to `prepare ENV`: "prepared new|kept SECONDS DIR", or "error WHY" (one line)."""
    started = time.perf_counter()
    try:
        env = json.loads(line)
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise ValueError("prepare takes one JSON object of strings (an environment)")
        directory, new = prepare(env)
    except Exception as exc:   # noqa: BLE001 - any failure is the answer; the zygote serves on
        return f"error {type(exc).__name__}: {exc}".replace("\n", " ")
    return f"prepared {'new' if new else 'kept'} {time.perf_counter() - started:.3f} {directory}".replace("\n", " ")


def zygote(pool_dir: Path, reaper: int) -> int:
    import torch

    cuda = torch.cuda.is_available()   # the zygote itself never initialises CUDA: members exec afresh
    if not cuda:
        warm(cuda=False)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    print(f"ready {'exec' if cuda else 'fork'}", flush=True)
    for line in sys.stdin:
        if line.startswith("prepare "):
            print(answer_prepare(line.removeprefix("prepare ")), flush=True)
            continue
        words = line.split()
        if len(words) != 2 or words[0] != "member" or not words[1].replace("-", "").isalnum():
            print("error bad command", flush=True)
            continue
        try:
            pid = member(pool_dir / f"{words[1]}.sock", reaper, cuda)
        except (OSError, RuntimeError) as exc:
            print(f"error {type(exc).__name__}: {exc}".replace("\n", " "), flush=True)
            continue
        print(f"member {words[1]} {pid}", flush=True)
    return 0


def cuda_member(path: Path, reaper: int) -> int:
    """A member exec'd by a zygote on a CUDA machine: initialise CUDA, warm, then wait like a forked one."""
    import torch

    _die_with_parent(reaper)
    torch.cuda.init()
    warm(cuda=True)
    random.seed()
    become_instance(wait_assignment(path))
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="the pool's 0700 folder for member sockets")
    parser.add_argument("--member", type=Path, help="(internal) be a CUDA member listening on this socket path")
    parser.add_argument("--reaper", type=int, required=True, help="pid of the gateway, the members' parent")
    args = parser.parse_args(argv)
    if args.member:
        return cuda_member(args.member, args.reaper)
    return zygote(args.dir, args.reaper)


if __name__ == "__main__":
    sys.exit(main())
