"""`duet simulate`: simulated users chat through the HTTP API and give feedback by a preference rule (with
noise), and the served policy's blind win rate against the base model is measured on held-out prompts
under the same rule as feedback accumulates. Writes result.json and learning_curve.png.

Feedback modes (`--feedback`): `pairs` (pairs forced, a pick by the rule), `thumbs` (single answers rated up
when the rule scores them above the median base answer), `edits` (single answers rewritten toward the
rule, e.g. shortened; an answer the editor leaves as it is gets a thumbs-up), `mixed` (each interaction
one of those, 50 / 30 / 20 %). Noise makes a pick or a rating random; edits have none.

The base model's answers are collected once, at the start (switching to `base` through the admin
API if a trained version is live); later evaluations only sample the live version.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydantic import BaseModel

from duet.preferences import judge, load_editor, load_rule, rate
from duet.prompts import prompt_sets
from feedback.arena import bootstrap_win_rate_by_prompt
from feedback.contract.registry import BASE_VERSION


class SimulationError(Exception):
    pass


@dataclass
class SimulateConfig:
    base_url: str = "http://127.0.0.1:8000"
    api_key: str = ""
    admin_key: str = ""
    rule: str = "shorter"
    feedback: str = "pairs"  # pairs | thumbs | edits | mixed
    noise: float = 0.1  # chance a vote is random instead of the rule's
    votes: int = 300
    concurrency: int = 4
    max_tokens: int = 48
    temperature: float = 0.8
    eval_every: int = 50  # votes between checks for a new version to evaluate
    eval_prompts: int = 32
    eval_samples: int = 2  # answers per held-out prompt and side
    settle_s: float = 0.0  # after the last vote, wait up to this long for a new version
    rate: float = 0.0  # votes per second at most (0: as fast as the server answers)
    max_minutes: float = 0.0  # stop voting after this long (0: when `votes` are cast)
    stop_at: tuple[float, float] | None = None  # (win rate, lower bound): stop voting once a checkpoint meets both
    out_dir: Path = field(default_factory=lambda: Path("simulation"))
    seed: int = 0
    progress: bool = True


FEEDBACK_MODES = ("pairs", "thumbs", "edits", "mixed")
MIXED = (("pairs", 0.5), ("thumbs", 0.3), ("edits", 0.2))


class CurvePoint(BaseModel):
    votes: int
    seconds: float
    model_version: str
    win_rate: float | None
    ci_low: float | None
    ci_high: float | None
    wins: int
    ties: int
    losses: int
    rm_accuracy: float | None


class SimulationResult(BaseModel):
    rule: str
    feedback: str = "pairs"
    noise: float
    thumbs_bar: float | None = None  # the rule's score a rated answer must beat for a thumbs-up
    votes_cast: int
    by_kind: dict[str, int] = {}  # feedback sent, by kind (pick, up, down, edit)
    votes_failed: int
    seconds: float
    versions_seen: list[str]
    final: CurvePoint
    curve: list[CurvePoint]
    first_version_at_votes: int | None
    plot: str


class Simulator:
    def __init__(self, cfg: SimulateConfig) -> None:
        self.cfg = cfg
        if cfg.feedback not in FEEDBACK_MODES:
            raise SimulationError(f"--feedback {cfg.feedback!r}: use one of {', '.join(FEEDBACK_MODES)}")
        self.rule = load_rule(cfg.rule)
        try:
            self.editor = load_editor(cfg.rule) if cfg.feedback in ("edits", "mixed") else None
        except ValueError as e:
            raise SimulationError(str(e)) from None
        self.bar = 0.0  # set from the base model's answers in run()
        self.by_kind: dict[str, int] = {}
        self.rng = random.Random(cfg.seed)
        self.train, held = prompt_sets(seed=cfg.seed)
        self.held_out = held[:cfg.eval_prompts]
        self.http = httpx.Client(base_url=cfg.base_url, timeout=300,
                                 limits=httpx.Limits(max_connections=cfg.concurrency + 2))
        self.model = ""
        self.lock = threading.Lock()
        self.cast = self.failed = 0
        self.t0 = time.time()

    # --- HTTP -------------------------------------------------------------------------------------
    def _headers(self, admin: bool = False) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.cfg.admin_key if admin else self.cfg.api_key}"}

    def _post(self, path: str, body: dict | None = None, admin: bool = False) -> dict:
        r = self.http.post(path, json=body, headers=self._headers(admin))
        if r.status_code >= 400:
            raise SimulationError(f"POST {path}: HTTP {r.status_code}: {_message(r)}")
        return r.json()

    def _get(self, path: str) -> dict:
        r = self.http.get(path, headers=self._headers())
        if r.status_code >= 400:
            raise SimulationError(f"GET {path}: HTTP {r.status_code}: {_message(r)}")
        return r.json()

    def wait_ready(self, timeout_s: float = 900) -> str:
        deadline = time.time() + timeout_s
        unreachable_until = time.time() + 30  # nothing listening at all: say so soon
        while True:
            try:
                r = self.http.get("/ready")
                unreachable_until = deadline
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                if time.time() > unreachable_until:
                    raise SimulationError(f"nothing answers at {self.cfg.base_url}: is `duet up` running?") from None
            if time.time() > deadline:
                raise SimulationError(f"{self.cfg.base_url} is not ready after {timeout_s:.0f} s: is `duet up` running?")
            time.sleep(2)
        self.model = self._get("/v1/models")["data"][0]["id"]
        return self.live_version()

    def live_version(self) -> str:
        return self.http.get("/ready").json()["model_version"]

    def chat(self, prompt: str, pairs: str, n: int = 1) -> tuple[list[str], dict]:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "n": n,
                "max_tokens": self.cfg.max_tokens, "temperature": self.cfg.temperature, "duet": {"pairs": pairs}}
        out = self._post("/v1/chat/completions", body)
        return [c["message"]["content"] for c in out["choices"]], out["duet"]

    # --- the simulated users -------------------------------------------------------------------------
    def vote_once(self, seed: int) -> None:
        rng = random.Random(seed)
        prompt = rng.choice(self.train)
        mode = self.cfg.feedback
        if mode == "mixed":
            mode = rng.choices([m for m, _ in MIXED], weights=[w for _, w in MIXED])[0]
        try:
            if mode == "pairs":
                (a, b), duet = self.chat(prompt, "force")
                body, kind = {"choice": judge(self.rule, prompt, a, b, self.cfg.noise, rng)}, "pick"
            else:
                [answer], duet = self.chat(prompt, "never")
                edited = self.editor(prompt, answer).strip() if mode == "edits" else None
                if edited and edited != answer.strip():
                    body, kind = {"edited_answer": edited}, "edit"
                else:
                    rating = rate(self.rule, prompt, answer, self.bar, self.cfg.noise, rng) if mode == "thumbs" else "up"
                    body, kind = {"rating": rating}, rating
            ident = {"comparison_id": duet["comparison_id"]} if mode == "pairs" else {"completion_id": duet["completion_id"]}
            self._post("/v1/feedback", {**ident, "vote_token": duet["vote_token"], **body})
            with self.lock:
                self.cast += 1
                self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        except (SimulationError, httpx.HTTPError, ValueError, TypeError, KeyError):
            with self.lock:
                self.failed += 1

    # --- evaluation -------------------------------------------------------------------------------
    def sample_held_out(self) -> tuple[list[list[str]], str]:
        with ThreadPoolExecutor(self.cfg.concurrency) as pool:
            outs = list(pool.map(lambda p: self.chat(p, "never", self.cfg.eval_samples), self.held_out))
        return [texts for texts, _ in outs], outs[-1][1]["model_version"]

    def base_answers(self) -> list[list[str]]:
        live = self.live_version()
        if live == BASE_VERSION:
            return self.sample_held_out()[0]
        if not self.cfg.admin_key:
            raise SimulationError(f"{live} is live: collecting the base model's answers needs the admin key "
                                  "(DUET_ADMIN_KEY) to switch to base for a moment")
        self._post("/admin/updates/pause", admin=True)
        try:
            self._post(f"/admin/models/{BASE_VERSION}/activate", admin=True)
            answers = self.sample_held_out()[0]
            self._post(f"/admin/models/{live}/activate", admin=True)
        finally:
            self._post("/admin/updates/resume", admin=True)
        return answers

    def evaluate(self, base: list[list[str]], votes: int) -> CurvePoint:
        policy, version = self.sample_held_out()
        by_prompt = [[{"a": 1.0, "tie": 0.5, "b": 0.0}[judge(self.rule, prompt, a, b)]  # no noise: the rule decides
                      for a, b in zip(mine, theirs)]
                     for prompt, mine, theirs in zip(self.held_out, policy, base)]
        verdicts = [v for group in by_prompt for v in group]
        w, t, l = verdicts.count(1.0), verdicts.count(0.5), verdicts.count(0.0)
        rate, lo, hi = bootstrap_win_rate_by_prompt(by_prompt, seed=self.cfg.seed)
        return CurvePoint(votes=votes, seconds=time.time() - self.t0, model_version=version, win_rate=rate,
                          ci_low=lo, ci_high=hi, wins=w, ties=t, losses=l, rm_accuracy=self.rm_accuracy())

    def rm_accuracy(self) -> float | None:
        try:
            rm = [s for s in self._get("/v1/dashboard?hours=720")["reward_model"] if s["held_out_accuracy"] is not None]
        except SimulationError:
            return None
        return rm[-1]["held_out_accuracy"] if rm else None

    # --- the run -----------------------------------------------------------------------------------
    def run(self) -> SimulationResult:
        cfg = self.cfg
        start_version = self.wait_ready()
        base = self.base_answers()
        self.bar = statistics.median(self.rule(p, a) for p, answers in zip(self.held_out, base) for a in answers)
        curve = [self.evaluate(base, 0)]  # also measured at the start: the noise floor around 50 %
        bar = _bar(cfg.votes, cfg.progress)
        seeds = iter(range(cfg.seed * 1_000_003, cfg.seed * 1_000_003 + cfg.votes))
        done = 0
        voting_until = time.time() + cfg.max_minutes * 60 if cfg.max_minutes > 0 else float("inf")
        with ThreadPoolExecutor(cfg.concurrency) as pool:
            while done < cfg.votes and time.time() < voting_until:
                batch = min(cfg.eval_every, cfg.votes - done)
                t_batch = time.time()
                list(pool.map(self.vote_once, [next(seeds) for _ in range(batch)]))
                if cfg.rate > 0:  # paced like real users, so the trainer keeps up as it would in production
                    time.sleep(max(0.0, batch / cfg.rate - (time.time() - t_batch)))
                done += batch
                bar.update(batch)
                bar.set_postfix(version=self.live_version(), win_rate=curve[-1].win_rate, failed=self.failed)
                curve.append(self._checkpoint(base, curve[-1], done))
                if cfg.stop_at and _meets(curve[-1], *cfg.stop_at):
                    break
        bar.close()
        deadline = time.time() + cfg.settle_s
        while time.time() < deadline and self.live_version() == curve[-1].model_version:
            time.sleep(2)
        final = self._checkpoint(base, curve[-1], done)
        if final is not curve[-1]:
            curve.append(final)
        if final.model_version != BASE_VERSION and cfg.admin_key:  # on the leaderboard, as an outside judge
            self._post("/admin/evaluations", {"model_a": final.model_version, "model_b": BASE_VERSION,
                                              "wins": final.wins, "ties": final.ties, "losses": final.losses,
                                              "judge": f"simulated:{cfg.rule}"}, admin=True)
        versions = list(dict.fromkeys([start_version] + [p.model_version for p in curve]))
        first = next((p.votes for p in curve if p.model_version != start_version), None)
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        result = SimulationResult(rule=cfg.rule, feedback=cfg.feedback, noise=cfg.noise, thumbs_bar=self.bar,
                                  votes_cast=self.cast, by_kind=self.by_kind, votes_failed=self.failed,
                                  seconds=time.time() - self.t0, versions_seen=versions, final=final, curve=curve,
                                  first_version_at_votes=first, plot=str(cfg.out_dir / "learning_curve.png"))
        plot_curve(result, Path(result.plot))
        (cfg.out_dir / "result.json").write_text(result.model_dump_json(indent=2))
        return result

    def _checkpoint(self, base: list[list[str]], last: CurvePoint, votes: int) -> CurvePoint:
        """Re-evaluate only when a new version went live; otherwise carry the last measurement on."""
        if self.live_version() != last.model_version:
            return self.evaluate(base, votes)
        return last.model_copy(update={"votes": votes, "seconds": time.time() - self.t0,
                                       "rm_accuracy": self.rm_accuracy()})


def _meets(p: CurvePoint, win_rate: float, ci_low: float) -> bool:
    return p.win_rate is not None and p.win_rate >= win_rate and p.ci_low is not None and p.ci_low >= ci_low


def plot_curve(result: SimulationResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in result.curve if p.win_rate is not None]
    x = [p.votes for p in pts]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.fill_between(x, [p.ci_low for p in pts], [p.ci_high for p in pts], step="post", alpha=0.2, color="C0",
                    label="95 % bootstrap CI (resampling prompts)")
    ax.step(x, [p.win_rate for p in pts], where="post", color="C0", label="win rate vs base (held-out prompts)")
    rm = [(p.votes, p.rm_accuracy) for p in result.curve if p.rm_accuracy is not None]
    if rm:
        ax.plot(*zip(*rm), "o-", color="C2", ms=3, label="reward model held-out accuracy")
    for p in pts:
        if p is not pts[0] and p.model_version != pts[pts.index(p) - 1].model_version:
            ax.annotate(p.model_version, (p.votes, p.win_rate), textcoords="offset points", xytext=(2, 6),
                        fontsize=6.5, ha="left", rotation=35)  # slanted: versions often go live close together
    ax.axhline(0.5, color="grey", ls="--", lw=0.8)
    ax.set_ylim(0, 1.18)  # room above 1.0 for the version labels
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_xlabel("votes" if result.feedback == "pairs" else "feedback (votes, ratings, edits)")
    ax.set_title(f"duet simulate: rule '{result.rule}', {result.feedback}, noise {result.noise}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="simulated votes", unit="vote", disable=not enabled)


def _message(r: httpx.Response) -> str:
    try:
        return r.json()["error"]["message"]
    except Exception:
        return r.text[:200]
