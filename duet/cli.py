"""The `duet` command. Errors are one line on stderr with exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import sys
import threading
import time

from pydantic import ValidationError



class CLIError(Exception):
    pass


def _settings(**overrides):
    from duet.settings import Settings

    try:
        return Settings(**overrides)
    except ValidationError as e:
        err = e.errors()[0]
        raise CLIError(f"bad setting DUET_{str(err['loc'][0]).upper()}: {err['msg']}") from None


def _redis_error(url: str, timeout_s: float = 2.0) -> str | None:
    """None if Redis at `url` answers a ping, else the kind of error."""
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=timeout_s).ping()
        return None
    except Exception as e:
        return type(e).__name__


def _check_redis(url: str) -> None:
    err = _redis_error(url)
    if err:
        raise CLIError(f"Redis at {url} does not answer ({err}); start one "
                       f"(e.g. `redis-server --daemonize yes`) or set DUET_REDIS_URL")


def _hold(path, what: str, setting: str) -> None:
    from duet.home_lock import AlreadyRunning, hold

    try:
        hold(path, what)
    except AlreadyRunning as e:
        raise CLIError(f"{e}: stop it first, or give this one another {setting}") from None


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from duet.wiring import build_app

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    s = _settings(**overrides)
    _check_redis(s.redis_url)
    if s.serving_cpus:
        from duet.cpus import parse_cpus, pin_serving

        _pin(pin_serving, parse_cpus(s.serving_cpus), "DUET_SERVING_CPUS")
    s = _resolve_canary(s)  # after the checks: "auto" may convert the model first (minutes, a progress bar)
    # No access log: one log line per request costs ~15 % of the vote path; /metrics counts requests.
    uvicorn.run(build_app(s), host=s.host, port=s.port, log_level="info", access_log=False,
                timeout_graceful_shutdown=30)


def cmd_up(args: argparse.Namespace) -> None:
    """Run the whole loop on embedded defaults, supervised: Redis (a private one if none answers), the
    embedded broker (unless DUET_KAFKA_BOOTSTRAP is set), the API (with its outbox relay) and the trainer."""
    from duet.model_assets import resolve_model
    from duet.supervisor import Child, Supervisor, spawn
    from duet.broker import EmbeddedBroker
    from feedback.contract.topics import ensure_topics

    s = _settings()
    _hold(s.home / "duet.lock", f"duet up on port {args.port or s.port}", "DUET_HOME")
    _release_checks(s), _gate_prompts(s)  # a bad file is an error now, not a trainer that crash-loops
    run_dir = s.home / "runs" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    sup = Supervisor()
    try:
        # what the children must agree on is resolved here once and handed to both as their settings (to_env)
        given: dict = {"redis_url": _redis_for_up(s, sup, run_dir)}
        resolve_model(s.model, s.home)  # converts the default model on first run, with a progress bar
        given["dev_key"] = s.dev_key or _persistent_dev_key(s.home)
        given["admin_key"] = s.admin_key or _persistent_admin_key(s.home)
        if not s.kafka_bootstrap:
            broker = EmbeddedBroker(log_path=run_dir / "broker.log")
            sup.add(Child("broker", lambda: broker.start().proc, stop_timeout_s=10))
            given["kafka_bootstrap"], given["trainer_fresh_broker"] = broker.bootstrap, True
            print(f"duet: broker    {broker.bootstrap} (embedded tansu, in memory)")
        bootstrap = given.get("kafka_bootstrap", s.kafka_bootstrap)
        try:
            ensure_topics(bootstrap, s.kafka_partitions, s.kafka_replication, s.kafka_min_insync)
        except Exception as e:
            raise CLIError(f"Kafka at {bootstrap} does not answer ({type(e).__name__}): check DUET_KAFKA_BOOTSTRAP") from None
        given["host"], given["port"] = args.host or s.host, args.port or s.port
        given |= _split_cores(s)
        s = _resolve_canary(s.model_copy(update=given), say=True)  # serving and the trainer must agree on who decides
        if not s.trainer_rollout_url:
            s = s.model_copy(update={"trainer_rollout_url": f"http://{s.host}:{s.port}"})  # serving samples for it
        env, me, host, port = s.to_env(), [sys.executable, "-m", "duet.cli"], s.host, s.port
        # The trainer is its own process: its steps must not share the API's GIL.
        sup.add(Child("trainer", lambda: spawn(me + ["train"], env, run_dir / "trainer.log")))
        sup.add(Child("serving", lambda: spawn(me + ["serve"], env, run_dir / "serving.log")))
        _serve_metrics(s.supervisor_metrics_port, s.host, "supervisor")
        base = f"http://{host}:{port}"
        print(f"duet: chat      {base}/#key={s.dev_key}")
        print(f"duet: dashboard {base}/dashboard")
        print(f"duet: API       {base}/v1  (OpenAI-compatible; votes: POST /v1/feedback)")
        print(f"duet: dev key   {s.dev_key}   admin key in {s.home / 'admin_key'}")
        print(f"duet: metrics   {base}/metrics, trainer :{s.trainer_metrics_port}, relay :{s.relay_metrics_port}, "
              f"supervisor :{s.supervisor_metrics_port}")
        print(f"duet: logs      {run_dir}")
        print("duet: the model loads in the background; /ready turns 200 when it can answer. Ctrl-C stops.",
              flush=True)
        threading.Thread(target=_announce_ready, args=(f"{base}/ready", sup), daemon=True).start()
        import signal

        # SIGTERM (docker, systemd) and SIGINT stop the loop; explicit, since a shell may start a
        # background job with SIGINT ignored.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: sup.stopping.set())
        sup.run()
        print("\nduet: stopping ...", flush=True)
    except KeyboardInterrupt:
        print("\nduet: stopping ...", flush=True)
    finally:
        sup.stop()


def _resolve_canary(s, say: bool = False):
    from duet.wiring import resolve_canary

    return resolve_canary(s, print if say else None)


def _pin(pin, cpus: tuple[int, ...], setting: str) -> None:
    try:
        pin(cpus)
    except OSError as e:  # e.g. a core this machine (or container) does not have
        raise CLIError(f"{setting}={','.join(map(str, cpus))}: cannot run there ({e.strerror})") from None


def _split_cores(s) -> dict[str, str]:
    """Disjoint cores for serving and the trainer (duet/cpus.py): the serving_cpus / trainer_cpus settings both
    children get; none with DUET_CPU_SPLIT=off."""
    from duet.cpus import available_cpus, format_cpus, plan_split

    if s.cpu_split == "off":
        return {}
    try:
        split = plan_split(available_cpus(), s.serving_cpus, s.trainer_cpus)
    except ValueError as e:
        raise CLIError(f"bad DUET_SERVING_CPUS / DUET_TRAINER_CPUS: {e}") from None
    cores = {"serving_cpus": format_cpus(split.serving), "trainer_cpus": format_cpus(split.trainer)}
    shared = "" if split.disjoint else " (shared: this machine has one core)"
    print(f"duet: cores     serving {cores['serving_cpus']}, trainer {cores['trainer_cpus']}{shared}")
    return cores


def _announce_ready(url: str, sup) -> None:
    import urllib.request

    while not sup.stopping.is_set():
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    print("duet: ready", flush=True)
                    return
        except Exception:
            pass
        time.sleep(1)


def _redis_for_up(s, sup, run_dir) -> str:
    """DUET_REDIS_URL if it answers; else a private redis-server (append-only file under the home
    folder, so votes survive a restart) supervised like the other children."""
    import shutil

    err = _redis_error(s.redis_url)
    if err is None:
        return s.redis_url
    binary = shutil.which("redis-server")
    if binary is None:
        raise CLIError(f"Redis at {s.redis_url} does not answer ({err}) and no redis-server is on PATH: install "
                       f"one (e.g. `apt install redis-server`) or set DUET_REDIS_URL")
    from duet.supervisor import Child, spawn
    from duet.broker import free_port

    port = free_port()
    data = s.home / "redis"
    data.mkdir(parents=True, exist_ok=True)
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--appendonly", "yes",
            "--save", ""]
    sup.add(Child("redis", lambda: spawn(argv, dict(os.environ), run_dir / "redis.log"), stop_timeout_s=10))
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.time() + 15
    while _redis_error(url, timeout_s=1.0):
        if time.time() > deadline:
            raise CLIError(f"the private redis-server did not start; see {run_dir / 'redis.log'}")
        time.sleep(0.2)
    print(f"duet: redis     {url} (private; {s.redis_url} did not answer)")
    return url


def _persistent_secret(home, name: str, prefix: str) -> str:
    """A local-development secret generated once and kept (mode 600) under the home folder."""
    path = home / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(prefix + secrets.token_urlsafe(24))
        path.chmod(0o600)
    return path.read_text().strip()


def _persistent_dev_key(home) -> str:
    return _persistent_secret(home, "dev_key", "duet-dev-")


def _persistent_admin_key(home) -> str:
    return _persistent_secret(home, "admin_key", "duet-admin-")


def _serve_metrics(port: int, host: str, what: str) -> None:
    """Prometheus metrics of a background process on its own port (0: off)."""
    if not port:
        return
    from prometheus_client import start_http_server

    try:
        start_http_server(port, addr=host)
    except OSError as e:  # e.g. a second Duet on this machine: keep working, unobserved
        logging.getLogger(__name__).warning("%s metrics port %d unavailable (%s); metrics off", what, port, e)


def cmd_relay(args: argparse.Namespace) -> None:
    """Publish the vote outbox to Kafka until stopped (serving starts this itself unless DUET_RELAY=off)."""
    from duet.wiring import build_relay

    s = _settings()
    if args.with_parent:
        from duet.processes import die_with_parent

        die_with_parent()
    if not s.kafka_bootstrap:
        raise CLIError("DUET_KAFKA_BOOTSTRAP is not set: the relay needs a broker")
    _check_redis(s.redis_url)
    _serve_metrics(s.relay_metrics_port, s.host, "relay")
    build_relay(s).run_forever()


def _release_checks(s):
    from duet.wiring import release_checks
    from trainer.release_checks import ReleaseChecksError

    try:
        return release_checks(s)
    except ReleaseChecksError as e:
        raise CLIError(f"{e} (DUET_RELEASE_CHECKS)") from None


def _gate_prompts(s) -> list[str]:
    from duet.wiring import gate_prompts
    from trainer.gate import GatePromptsError

    try:
        return gate_prompts(s)
    except GatePromptsError as e:
        raise CLIError(str(e)) from None


def cmd_train(args: argparse.Namespace) -> None:
    """The trainer: consume votes, train the reward model, checkpoint, and run policy rounds."""
    s = _settings()  # DUET_CANARY=auto is resolved by build_trainer, after these checks
    _release_checks(s), _gate_prompts(s)  # a bad file: one line now, before anything starts
    if not s.kafka_bootstrap:
        raise CLIError("DUET_KAFKA_BOOTSTRAP is not set: the trainer reads votes from Kafka")
    if s.trainer_ranks > 1 and "RANK" not in os.environ:  # become torchrun, which starts the ranks
        flags = ["--once"] * args.once + ["--round"] * args.round
        os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc-per-node={s.trainer_ranks}", f"--max-restarts={s.trainer_max_restarts}",
                                  "-m", "duet.cli", "train", *flags])
    from trainer.distributed import launched_rank

    rank, local_rank = launched_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    from duet.wiring import checkpoint_dir

    if rank == 0:  # the one committer
        _hold(checkpoint_dir(s) / ".lock", "duet train", "DUET_HOME")
    if s.trainer_cpus or "LOCAL_WORLD_SIZE" in os.environ:
        from duet.cpus import available_cpus, parse_cpus, pin_trainer, rank_cpus

        cpus = rank_cpus(parse_cpus(s.trainer_cpus) or available_cpus(), local_rank,
                         int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        _pin(pin_trainer, cpus, "DUET_TRAINER_CPUS")  # before torch starts its thread pool
    if s.trainer_nice:
        os.nice(s.trainer_nice)  # serving first where cores are shared
    from duet.wiring import build_trainer

    svc = build_trainer(s)
    if args.round:
        result = svc.one_round()
        if rank != 0:
            return
        if result is None:
            raise CLIError("no policy round: the trainer has no trained comparisons yet")
        if result.published is None:
            raise CLIError(f"the gate refused the candidate: {', '.join(result.gate.reasons)} {result.gate.metrics}")
        print(f"duet: published {result.published.name} ({result.gate.metrics})")
        return
    if not args.once and rank == 0:
        _serve_metrics(s.trainer_metrics_port, s.host, "trainer")
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: svc.stop.set())
    state = svc.run(once=args.once)
    if rank != 0:
        return
    print(f"duet: trained on {state.events_trained} votes ({state.events_held_out} held out); "
          f"held-out accuracy {state.held_out_accuracy}")


def cmd_models(args: argparse.Namespace) -> None:
    from feedback.contract.registry import Registry

    reg = Registry(_settings().registry_root())
    if args.models_command == "list":
        latest = reg.latest()
        for m in reg.versions():
            mark = "*" if latest and m.version == latest.version else " "
            print(f"{mark} {m.name}  parent={m.parent_version}  {m.algorithm}  {m.created_at:%Y-%m-%d %H:%M:%S}  "
                  f"win_rate={m.eval.get('win_rate')}  kl={m.eval.get('kl')}")
        if not reg.versions():
            print("no published versions yet", file=sys.stderr)
        return
    m = reg.show(args.version)
    if m is None:
        raise CLIError(f"no version {args.version!r} in {reg.root}")
    print(m.model_dump_json(indent=2))


def cmd_keys_create(args: argparse.Namespace) -> None:
    import redis.asyncio as aioredis

    from serving.auth import KeyStore

    s = _settings()
    _check_redis(s.redis_url)
    if args.pair_rate is not None and not 0.0 <= args.pair_rate <= 1.0:
        raise CLIError("--pair-rate must be between 0 and 1")
    if args.rate_limit is not None and args.rate_limit < 1:
        raise CLIError("--rate-limit must be at least 1")

    async def run():
        r = aioredis.from_url(s.redis_url, decode_responses=True)
        try:
            return await KeyStore(r).create(args.name, pair_rate=args.pair_rate, rate_limit_rpm=args.rate_limit)
        finally:
            await r.aclose()

    key, record = asyncio.run(run())
    print(key)
    print(f"key id {record.key_id} ({record.name}); shown once, stored hashed", file=sys.stderr)


def cmd_model_prepare(args: argparse.Namespace) -> None:
    from duet.model_assets import ModelNotFound, resolve_model

    s = _settings()
    try:
        print(resolve_model(s.model, s.home))
    except ModelNotFound as e:
        raise CLIError(str(e)) from None


def cmd_simulate(args: argparse.Namespace) -> None:
    """Simulated users vote by a rule; prints where the result and the learning curve went."""
    from pathlib import Path

    from duet.preferences import load_editor, load_rule
    from duet.simulate import SimulateConfig, SimulationError, Simulator

    s = _settings()
    if not 0.0 <= args.noise <= 1.0:
        raise CLIError("--noise must be between 0 and 1")
    for flag in ("votes", "concurrency", "eval_every", "eval_prompts", "eval_samples", "max_tokens"):
        if getattr(args, flag) < 1:
            raise CLIError(f"--{flag.replace('_', '-')} must be at least 1")
    try:
        load_rule(args.rule)
        if args.feedback in ("edits", "mixed"):
            load_editor(args.rule)
    except ValueError as e:
        raise CLIError(str(e)) from None
    admin_file = s.home / "admin_key"
    cfg = SimulateConfig(
        base_url=args.url or f"http://{s.host}:{s.port}",
        api_key=args.api_key or s.dev_key or _persistent_dev_key(s.home),
        admin_key=args.admin_key or s.admin_key or (admin_file.read_text().strip() if admin_file.exists() else ""),
        rule=args.rule, feedback=args.feedback, noise=args.noise, votes=args.votes, concurrency=args.concurrency, max_tokens=args.max_tokens,
        eval_every=args.eval_every, eval_prompts=args.eval_prompts, eval_samples=args.eval_samples,
        settle_s=args.settle_s, rate=args.rate, max_minutes=args.minutes, out_dir=Path(args.out), seed=args.seed, progress=True,
        stop_at=tuple(args.stop_at) if args.stop_at else None)
    try:
        result = Simulator(cfg).run()
    except SimulationError as e:
        raise CLIError(str(e)) from None
    f = result.final
    kinds = ", ".join(f"{v} {k}" for k, v in sorted(result.by_kind.items()))
    print(f"duet: {result.votes_cast} votes ({kinds}; {result.votes_failed} failed) in {result.seconds:.0f} s; "
          f"{f.model_version} vs base under '{args.rule}': win rate {f.win_rate:.3f} "
          f"[{f.ci_low:.3f}, {f.ci_high:.3f}]; result {cfg.out_dir / 'result.json'}, curve {result.plot}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="duet", description="A chat API that learns from its users' votes.")
    sub = p.add_subparsers(dest="command", required=True)

    for name, fn, help_ in (("up", cmd_up, "run Duet on embedded defaults"),
                            ("serve", cmd_serve, "run the serving API only")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--host")
        sp.add_argument("--port", type=int)
        sp.set_defaults(fn=fn)

    relay = sub.add_parser("relay", help="publish the vote outbox to Kafka")
    relay.add_argument("--with-parent", action="store_true",
                       help="exit when the parent process dies (how serving runs it as its child)")
    relay.set_defaults(fn=cmd_relay)
    tr = sub.add_parser("train", help="run the reward-model trainer")
    tr.add_argument("--once", action="store_true", help="train on what is on Kafka now, then exit")
    tr.add_argument("--round", action="store_true", help="run one policy round now (gate, publish), then exit")
    tr.set_defaults(fn=cmd_train)

    sim = sub.add_parser("simulate", help="simulated users vote by a rule; measure the win rate against base")
    sim.add_argument("--rule", default="shorter", help="shorter, keyword, polite, engaging, or module:function")
    sim.add_argument("--feedback", choices=("pairs", "thumbs", "edits", "mixed"), default="pairs",
                     help="what users give: picks between two answers, thumbs on one, edits of one, or a mix")
    sim.add_argument("--votes", type=int, default=300, help="interactions with feedback (picks, ratings, edits)")
    sim.add_argument("--noise", type=float, default=0.1, help="chance a vote is random")
    sim.add_argument("--concurrency", type=int, default=4)
    sim.add_argument("--max-tokens", type=int, default=48)
    sim.add_argument("--eval-every", type=int, default=50, help="votes between checks for a new version")
    sim.add_argument("--eval-prompts", type=int, default=32)
    sim.add_argument("--eval-samples", type=int, default=2)
    sim.add_argument("--settle-s", type=float, default=0.0, help="after the last vote, wait this long for a new version")
    sim.add_argument("--rate", type=float, default=0.0, help="at most this many votes per second (0: no limit)")
    sim.add_argument("--minutes", type=float, default=0.0, help="stop voting after this many minutes (0: no limit)")
    sim.add_argument("--stop-at", type=float, nargs=2, metavar=("WIN_RATE", "CI_LOW"),
                     help="stop voting once a version is measured at this win rate and lower bound")
    sim.add_argument("--out", default="simulation", help="folder for result.json and learning_curve.png")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--url", help="Duet's base URL (default http://DUET_HOST:DUET_PORT)")
    sim.add_argument("--api-key", help="default: DUET_DEV_KEY, else the key `duet up` printed")
    sim.add_argument("--admin-key", help="default: DUET_ADMIN_KEY, else the one `duet up` keeps")
    sim.set_defaults(fn=cmd_simulate)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    kc = keys.add_parser("create", help="create an API key and print it")
    kc.add_argument("--name", default="default")
    kc.add_argument("--pair-rate", type=float, help="this key's chance of paired answers (overrides DUET_PAIR_RATE)")
    kc.add_argument("--rate-limit", type=int, help="requests per minute for this key")
    kc.set_defaults(fn=cmd_keys_create)

    models = sub.add_parser("models", help="published policy versions").add_subparsers(dest="models_command",
                                                                                       required=True)
    models.add_parser("list", help="list versions (* = latest)").set_defaults(fn=cmd_models)
    show = models.add_parser("show", help="a version's manifest")
    show.add_argument("version", help="number or folder name, e.g. 3 or v000003")
    show.set_defaults(fn=cmd_models)

    model = sub.add_parser("model", help="the served model").add_subparsers(dest="model_command", required=True)
    mp = model.add_parser("prepare", help="convert the default model once and print its folder")
    mp.set_defaults(fn=cmd_model_prepare)
    return p


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns progress bars  # kafka-python logs every connection at INFO
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except CLIError as e:
        print(f"duet: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
