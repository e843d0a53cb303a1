"""A BatchedEnv whose slots are stepped in worker processes.

Environment stepping (MuJoCo) is host-bound and single-threaded per env, so a
batch can be split over processes: :class:`SubprocessBatchedEnv` gives each of
``num_workers`` processes a contiguous block of slots, each process builds its
own in-process BatchedEnv from a picklable ``factory(n_slots)``, and a batched
reset or step is sent to all workers before any answer is awaited, so they run
in parallel. Results are the in-process ones bit for bit: every slot sees the
same resets and actions in the same order, and arrays travel pickled.

Workers are started with the "spawn" context (JAX is not fork-safe, and a
forked copy of a process that has started XLA threads can deadlock), so the
factory and everything it references must be importable in a fresh interpreter.

Why not ``gymnasium.vector.AsyncVectorEnv``: it runs one process per env, steps
every env at every step (a finished Meta-World episode may not be stepped again:
the env raises past its step budget), and resets through autoreset/seed
semantics, not to a given layout per slot. A block of slots per process behind
a pipe is what this needs, and is short.
"""

from __future__ import annotations

import multiprocessing
import signal
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from energyflow_jax.envs.base import BatchedEnv, StepResult

EnvFactory = Callable[[int], BatchedEnv]  # n slots -> an in-process BatchedEnv


def make_batched_env(factory: EnvFactory, num_envs: int, num_workers: int = 0) -> BatchedEnv:
    """``factory(num_envs)`` in this process (num_workers=0) or split over worker processes."""
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if num_workers == 0:
        return factory(num_envs)
    return SubprocessBatchedEnv(factory, num_envs, num_workers)


def _worker(conn, factory: EnvFactory, n_slots: int) -> None:
    # Ctrl-C reaches the whole process group; the parent handles it and closes the
    # workers, so they print no tracebacks of their own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        env = factory(n_slots)
        conn.send(("ok", (env.obs_dim, env.action_dim, env.max_steps)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(("error", traceback.format_exc()))
        conn.close()
        return
    try:
        while True:
            try:
                command, args = conn.recv()
            except EOFError:  # the parent went away
                break
            if command == "close":
                break
            try:
                conn.send(("ok", getattr(env, command)(*args)))
            except Exception:  # noqa: BLE001
                conn.send(("error", traceback.format_exc()))
    finally:
        env.close()
        conn.close()


class WorkerError(RuntimeError):
    """An exception inside a worker process; the message holds its traceback."""


class SubprocessBatchedEnv:
    """``num_envs`` slots split over ``num_workers`` processes (contiguous blocks)."""

    def __init__(self, factory: EnvFactory, num_envs: int, num_workers: int, context: str = "spawn"):
        if num_envs < 1 or num_workers < 1:
            raise ValueError(f"num_envs and num_workers must be >= 1, got {num_envs}, {num_workers}")
        ctx = multiprocessing.get_context(context)
        blocks = [b for b in np.array_split(np.arange(num_envs), min(num_workers, num_envs))]
        self._bounds = [(int(b[0]), int(b[-1]) + 1) for b in blocks]
        self._num_envs = num_envs
        self._conns, self._procs = [], []
        try:
            for start, stop in self._bounds:
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(child, factory, stop - start), daemon=True)
                proc.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(proc)
            dims = self._receive(range(len(self._conns)))
        except BaseException:
            self.close()
            raise
        if len(set(dims)) != 1:
            self.close()
            raise ValueError(f"workers disagree on (obs_dim, action_dim, max_steps): {dims}")
        self._obs_dim, self._action_dim, self._max_steps = dims[0]

    @property
    def num_envs(self) -> int:
        return self._num_envs

    @property
    def obs_dim(self) -> int:
        return self._obs_dim

    @property
    def action_dim(self) -> int:
        return self._action_dim

    @property
    def max_steps(self) -> int:
        return self._max_steps

    @property
    def num_workers(self) -> int:
        return len(self._procs)

    def _receive(self, workers: Sequence[int]) -> list[Any]:
        answers, errors = [], []
        for w in workers:
            try:
                status, payload = self._conns[w].recv()
            except EOFError:
                status, payload = "error", f"worker {w} exited (exit code {self._procs[w].exitcode})"
            if status == "error":
                errors.append(payload)
            answers.append(payload)
        if errors:
            raise WorkerError("env worker failed:\n" + "\n".join(errors))
        return answers

    def reset(self, layout_ids: Sequence[int]) -> tuple[np.ndarray, list[dict[str, Any]]]:
        if len(layout_ids) > self._num_envs:
            raise ValueError(f"{len(layout_ids)} layout ids for {self._num_envs} envs")
        ids = [int(i) for i in layout_ids]
        # Slots 0..len-1 are reset: a prefix of each worker's block.
        workers = [w for w, (start, _) in enumerate(self._bounds) if start < len(ids)]
        for w in workers:
            start, stop = self._bounds[w]
            self._conns[w].send(("reset", (ids[start:stop],)))
        answers = self._receive(workers)
        obs = np.concatenate([a[0] for a in answers]) if answers else np.zeros((0, self._obs_dim))
        infos = [info for a in answers for info in a[1]]
        return obs, infos

    def step(self, actions: np.ndarray, active: np.ndarray) -> StepResult:
        actions = np.asarray(actions)
        active = np.asarray(active, bool)
        workers = [w for w, (start, stop) in enumerate(self._bounds) if active[start:stop].any()]
        for w in workers:
            start, stop = self._bounds[w]
            self._conns[w].send(("step", (actions[start:stop], active[start:stop])))
        answers = dict(zip(workers, self._receive(workers)))
        obs = np.zeros((self._num_envs, self._obs_dim), np.float64)
        reward = np.zeros(self._num_envs, np.float64)
        success = np.zeros(self._num_envs, bool)
        for w, result in answers.items():
            start, stop = self._bounds[w]
            obs[start:stop], reward[start:stop], success[start:stop] = result
        return StepResult(obs, reward, success)

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(("close", ()))
            except (BrokenPipeError, OSError):
                pass
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []

    def __del__(self):
        if getattr(self, "_procs", None):
            self.close()
