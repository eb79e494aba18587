"""RLVE adaptive curriculum: reasoning-gym tasks whose difficulty follows the policy (ZAYA1 RL stage 2).

    source = CurriculumSource(list(RLVE_DEFAULT_ENVIRONMENTS), seed=0, instruction=BOXED_INSTRUCTION)
    question, reference = source[1234]     # reference["rlve_env"], reference["rlve_difficulty"]
    source.verifier.score(completion, reference)
    source.observe([(env, difficulty, solve_rate), ...])   # every group of a step, same order on every rank
    source.metrics()                       # curriculum/difficulty/<env>, curriculum/groups/<env>, ...

Difficulty d of a task is a level of its reasoning-gym curriculum: every attribute at level min(d, its last
level), each range taken as that level's own segment (reasoning-gym's `upper_bound` mode), so problems "at
d" are problems of level d rather than a mix of levels 0..d. A task's levels run from 0 to the first level
whose configuration equals the last one (some attributes repeat their top value).

Update, per group in the order given: the environment's group count goes up by one; if the group was
generated at the environment's current difficulty, d goes up by one when its solve rate is above
`up_threshold` and down by one when it is exactly 0 (within the task's levels); otherwise d stays. A group
generated at an older difficulty (another group of the same step already moved d) is counted but moves
nothing, so d moves at most once per environment per step.

Sampling: problem i's environment is drawn by a hash of (seed, i) with probabilities proportional to
1 / (1 + groups_e - min groups), so the least-sampled environments are drawn most, and an environment k
groups ahead of the least-sampled one keeps 1/(1+k) of its weight however long the run (1 / (1 + groups_e)
would fade towards uniform as the counts grow). Every problem of a step is drawn from the state left by the
previous step.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import reasoning_gym
from reasoning_gym.coaching.base_curriculum import DefaultCurriculumContext, RangeAttributeMode
from reasoning_gym.factory import create_curriculum, has_curriculum

from zaya_train.rewards import ReasoningGymVerifier
from zaya_train.rewards.reasoning_gym_verifier import ScoreFn
from zaya_train.rsa.core import stable_hash64

# Tasks with curricula that generate offline in under 5 ms per problem at every level, with short answers
# that a `\boxed{}` holds, over arithmetic, algorithmic, graph, logic, probability and algebra problems.
RLVE_DEFAULT_ENVIRONMENTS = (
    "chain_sum",
    "basic_arithmetic",
    "bitwise_arithmetic",
    "base_conversion",
    "leg_counting",
    "time_intervals",
    "coin_flip",
    "letter_counting",
    "family_relationships",
    "knights_knaves",
    "self_reference",
    "aiw",
    "simple_equations",
)
BOXED_INSTRUCTION = "\nPut the final answer in \\boxed{}."
ENV_KEY, DIFFICULTY_KEY = "rlve_env", "rlve_difficulty"
# Problem i of an (environment, difficulty) is entry i of its dataset; this is only the dataset's nominal
# length (entries are generated from (dataset seed, i) for any i).
DATASET_SIZE = 1_000_000


@functools.cache
def level_configs(env: str) -> tuple[Any, ...]:
    """The task's dataset config at each difficulty level, up to the first level equal to the last one."""
    if not isinstance(env, str) or not has_curriculum(env):
        raise ValueError(f"environment {env!r} is not a reasoning-gym task with a curriculum")
    curriculum = create_curriculum(env)
    context = DefaultCurriculumContext(mode=RangeAttributeMode.UPPER_BOUND)
    configs = []
    for level in range(max(len(attr.levels) for attr in curriculum.attributes.values())):
        curriculum.set_global_level(level)
        configs.append(curriculum.generate_configuration({}, context))
    top = next(level for level, config in enumerate(configs) if config == configs[-1])
    return tuple(configs[: top + 1])


def max_difficulty(env: str) -> int:
    return len(level_configs(env)) - 1


def create_level_dataset(env: str, difficulty: int, seed: int) -> Any:
    config = level_configs(env)[difficulty]
    kwargs = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    return reasoning_gym.create_dataset(env, **{**kwargs, "seed": seed, "size": DATASET_SIZE})


def _unit_hash(*parts: object) -> float:
    """A uniform number in [0, 1) from a hash of `parts` (53 bits: exact in a float)."""
    return (stable_hash64(*parts) >> 11) / float(1 << 53)


class Curriculum:
    """Per-environment difficulty and group counts; the update and sampling rules: the module docstring."""

    def __init__(self, environments: Sequence[str], seed: int, start_difficulty: int = 0,
                 up_threshold: float = 0.7) -> None:
        environments = list(environments)
        if not environments:
            raise ValueError("environments: need at least one reasoning-gym task, got none")
        if len(set(environments)) != len(environments):
            raise ValueError(f"environments: each task at most once, got {environments}")
        if start_difficulty < 0:
            raise ValueError(f"start_difficulty must be >= 0, got {start_difficulty}")
        if not 0 <= up_threshold < 1:
            raise ValueError(f"up_threshold must be in [0, 1), got {up_threshold}")
        self.environments, self.seed, self.up_threshold = environments, seed, up_threshold
        self.max_difficulty = {env: max_difficulty(env) for env in environments}
        # A start above a task's last level starts that task at its last level.
        self.difficulty = {env: min(start_difficulty, top) for env, top in self.max_difficulty.items()}
        self.groups = {env: 0 for env in environments}

    def probabilities(self) -> dict[str, float]:
        """Each environment's chance of being drawn for a problem of the next step."""
        least = min(self.groups.values())
        weights = {env: 1.0 / (1 + count - least) for env, count in self.groups.items()}
        total = sum(weights.values())
        return {env: w / total for env, w in weights.items()}

    def choose(self, index: int) -> str:
        """The environment of problem `index`: a function of (state, seed, index)."""
        bounds = list(itertools.accumulate(self.probabilities().values()))
        at = bisect.bisect_right(bounds, _unit_hash("rlve-environment", self.seed, index) * bounds[-1])
        return self.environments[min(at, len(bounds) - 1)]

    def observe(self, results: Sequence[tuple[str, int, float]]) -> None:
        """Apply (environment, difficulty generated at, group solve rate) for each group, in order.
        Environments of other curricula are skipped, so a loop may hand every curriculum all results."""
        mine = [(env, int(d), float(rate)) for env, d, rate in results if env in self.groups]
        # Checked before any update, so a bad result leaves the state as it was.
        for env, _, rate in mine:
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"solve rate of a group of {env!r} must be in [0, 1], got {rate}")
        for env, d, rate in mine:
            self.groups[env] += 1
            if d != self.difficulty[env]:
                continue
            if rate > self.up_threshold:
                self.difficulty[env] = min(d + 1, self.max_difficulty[env])
            elif rate == 0.0:
                self.difficulty[env] = max(d - 1, 0)

    def state_dict(self) -> dict[str, Any]:
        return {"environments": list(self.environments), "difficulty": dict(self.difficulty),
                "groups": dict(self.groups)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state["environments"]
        if sorted(saved) != sorted(self.environments):
            raise ValueError(f"curriculum state is for environments {saved}, "
                             f"this run has {self.environments}")
        difficulty = {env: int(state["difficulty"][env]) for env in self.environments}
        groups = {env: int(state["groups"][env]) for env in self.environments}
        for env, d in difficulty.items():
            if not 0 <= d <= self.max_difficulty[env]:
                raise ValueError(f"curriculum state: difficulty {d} of {env!r} is outside "
                                 f"0..{self.max_difficulty[env]}")
        if min(groups.values()) < 0:
            raise ValueError(f"curriculum state: negative group count in {groups}")
        self.difficulty, self.groups = difficulty, groups

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for env in self.environments:
            out[f"curriculum/difficulty/{env}"] = float(self.difficulty[env])
            out[f"curriculum/groups/{env}"] = float(self.groups[env])
        n = len(self.environments)
        out["curriculum/mean_difficulty"] = sum(self.difficulty.values()) / n
        # Each task's difficulty as a fraction of its levels, so tasks with 4 and 36 levels weigh alike.
        out["curriculum/mean_progress"] = sum(
            self.difficulty[env] / self.max_difficulty[env] if self.max_difficulty[env] else 1.0
            for env in self.environments) / n
        return out


class CurriculumVerifier(ReasoningGymVerifier):
    """Scores an entry with the dataset that generated it, so config-dependent scorers see its config."""

    def __init__(self, dataset: Callable[[str, int], Any], answer_marker: str | None = None) -> None:
        super().__init__(answer_marker=answer_marker)
        self._dataset = dataset

    def _scorer(self, entry: Mapping[str, Any]) -> ScoreFn:
        return self._dataset(entry[ENV_KEY], entry[DIFFICULTY_KEY]).score_answer


class CurriculumSource:
    """A prompt source (zaya_train.rl.prompts.PromptSource's interface) over a Curriculum: problem i is
    entry i of the reasoning-gym dataset of (choose(i), its current difficulty), seeded by (seed,
    environment, difficulty)."""

    shuffle_rows = False

    def __init__(self, environments: Sequence[str], seed: int, start_difficulty: int = 0,
                 up_threshold: float = 0.7, instruction: str = "", answer_marker: str | None = None) -> None:
        self.curriculum = Curriculum(environments, seed, start_difficulty, up_threshold)
        self.seed, self.instruction = seed, instruction
        self.verifier = CurriculumVerifier(self.dataset, answer_marker)
        # Creating a dataset can take milliseconds (word lists, solvers); (task, level) pairs are few.
        self._datasets: dict[tuple[str, int], Any] = {}

    def dataset(self, env: str, difficulty: int) -> Any:
        key = (env, difficulty)
        if key not in self._datasets:
            if env not in self.curriculum.max_difficulty:
                raise ValueError(f"environment {env!r} is not one of {self.curriculum.environments}")
            # 31 bits: some tasks seed numpy or add the index to the seed.
            seed = stable_hash64("rlve-dataset", self.seed, env, difficulty) & 0x7FFF_FFFF
            self._datasets[key] = create_level_dataset(env, difficulty, seed)
        return self._datasets[key]

    def __getitem__(self, index: int) -> tuple[str, dict[str, Any]]:
        if index < 0:
            raise IndexError(f"problem index must be >= 0, got {index}")
        env = self.curriculum.choose(index)
        difficulty = self.curriculum.difficulty[env]
        entry = self.dataset(env, difficulty)[index]
        # reasoning-gym's scorers read only their own keys of the entry, so ours ride along in the same dict.
        reference = {**entry, ENV_KEY: env, DIFFICULTY_KEY: difficulty}
        return entry["question"] + self.instruction, reference

    def solution(self, index: int) -> None:
        return None

    def environment(self, index: int) -> str:
        """The task of problem `index` (rewards per task in the RL metrics)."""
        return self.curriculum.choose(index)

    def observe(self, results: Sequence[tuple[str, int, float]]) -> None:
        self.curriculum.observe(results)

    def state_dict(self) -> dict[str, Any]:
        return self.curriculum.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.curriculum.load_state_dict(state)

    def metrics(self) -> dict[str, float]:
        return self.curriculum.metrics()
