"""MetaWorld's scripted experts as agents: the source of demonstrations and a reference row."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from vlapt.envs.metaworld.tasks import check_task
from vlapt.interfaces import EnvConfig


class ScriptedExpert:
    """MetaWorld's hand-written expert for each task; reads the privileged 39-d state.

    Its raw actions are not bounded, so they are clipped to the action space, the same
    clipping the environment applies and the one stored in demonstrations.
    """

    name = "scripted"
    chunk_len = 1

    def __init__(self) -> None:
        self._experts: dict[str, Any] = {}

    def observation_config(self) -> EnvConfig:
        return EnvConfig(render=False, privileged_state=True)

    def expert(self, task: str):
        if task not in self._experts:
            from metaworld.policies import ENV_POLICY_MAP

            self._experts[task] = ENV_POLICY_MAP[check_task(task)]()
        return self._experts[task]

    def raw_action(self, state: np.ndarray, task: str) -> np.ndarray:
        """The expert's action before clipping (its controllers' gains can exceed the bounds)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MetaWorld warns on every unclipped action
            return np.asarray(self.expert(task).get_action(state), dtype=np.float32)

    def act_one(self, state: np.ndarray, task: str) -> np.ndarray:
        return np.clip(self.raw_action(state, task), -1.0, 1.0)

    def act(self, observations, tasks):
        return [self.act_one(obs["state"], task)[None] for obs, task in zip(observations, tasks)]


# -- faster controllers through the experts' own contacts -----------------------------------------------
# MetaWorld's experts visit their waypoints one after another (over the object, then down, then act), and
# several slow down near each one (proportional gains of 4-10). These controllers keep each task's phases, contact points and
# gripper logic, but approach down a cone (the height over the target shrinks with the horizontal distance
# still to go) and at full speed (gain 25), which is where most of the experts' steps above the full-speed
# floor go (scripts/steps_floor.py). Their constants were set on training configurations only; door-open and
# peg-insert-side keep MetaWorld's controller (docs/experiments/faster-demonstrations.md).

def _toward(hand: np.ndarray, target: np.ndarray, gain: float = 25.0) -> np.ndarray:
    return np.clip(gain * (np.asarray(target) - hand), -1.0, 1.0)


def _cone(point: np.ndarray, hand: np.ndarray, clearance: float, slope: float) -> np.ndarray:
    """Over ``point`` at a height that falls with the horizontal distance left: corners cut, nothing knocked over."""
    horizontal = float(np.linalg.norm(hand[:2] - point[:2]))
    return point + np.array([0.0, 0.0, min(clearance, slope * horizontal)])


def _action(xyz: np.ndarray, grip: float) -> np.ndarray:
    return np.array([*xyz, grip], dtype=np.float32)


def _fast_reach(s: np.ndarray) -> np.ndarray:
    return _action(_toward(s[0:3], s[36:39]), 0.0)


def _fast_push(s: np.ndarray) -> np.ndarray:
    hand, obj, goal = s[0:3], s[4:7], s[36:39]
    puck = obj + np.array([-0.005, 0.0, 0.0])
    if np.linalg.norm(hand[:2] - puck[:2]) > 0.02:
        xyz = _toward(hand, _cone(puck + [0.0, 0.0, 0.03], hand, 0.2, 1.0))
    elif abs(hand[2] - puck[2]) > 0.04:
        xyz = _toward(hand, puck + [0.0, 0.0, 0.03])
    else:
        xyz = _toward(hand, goal, gain=15.0)  # any faster and the puck slips out from under the fingers
    near = np.linalg.norm(hand[:2] - obj[:2]) <= 0.02 and abs(hand[2] - obj[2]) <= 0.10
    return _action(xyz, 0.6 if near else 0.0)


def _fast_pick_place(s: np.ndarray) -> np.ndarray:
    hand, opening, obj, goal = s[0:3], s[3], s[4:7], s[36:39]
    puck = obj + np.array([-0.005, 0.0, 0.0])
    if np.linalg.norm(hand[:2] - puck[:2]) > 0.02:
        target = _cone(puck + [0.0, 0.0, 0.03], hand, 0.1, 1.0)
    elif abs(hand[2] - puck[2]) > 0.05 and puck[2] < 0.04:
        target = puck + [0.0, 0.0, 0.03]
    elif opening > 0.73:  # wait for the fingers to close
        target = hand
    else:
        target = goal
    return _action(_toward(hand, target), 1.0 if np.linalg.norm(hand - obj) < 0.07 else 0.0)


def _fast_drawer_open(s: np.ndarray) -> np.ndarray:
    hand, handle = s[0:3], s[4:7] + np.array([0.0, 0.0, -0.02])
    if np.linalg.norm(hand[:2] - handle[:2]) > 0.06:
        xyz = _toward(hand, _cone(handle, hand, 0.3, 1.0))
    elif abs(hand[2] - handle[2]) > 0.04:
        xyz = _toward(hand, handle)
    else:
        xyz = _toward(hand, handle + [0.0, -0.06, 0.0], gain=50.0)
    return _action(xyz, -1.0)


def _fast_drawer_close(s: np.ndarray) -> np.ndarray:
    hand, handle = s[0:3], s[4:7] + np.array([0.0, 0.0, -0.02])
    front = handle + np.array([0.0, -0.075, 0.0])
    clear = handle[2] + 0.07
    if hand[1] > handle[1]:  # over the drawer: straight to the front of the handle, just clear of it (not 50 cm up)
        target = np.array([front[0], front[1], max(clear, min(hand[2], clear + 0.05))])
        if hand[2] < clear - 0.01:
            target = np.array([hand[0], hand[1], clear + 0.02])
    elif abs(hand[2] - handle[2]) > 0.04:
        target = front
    else:
        target = handle
    return _action(_toward(hand, target), 1.0)


def _fast_button_press_topdown(s: np.ndarray) -> np.ndarray:
    hand, button = s[0:3], s[4:7]
    if np.linalg.norm(hand[:2] - button[:2]) > 0.04:
        target = _cone(button, hand, 0.1, 0.5)
        target[2] = max(target[2], button[2] + 0.02)
    else:
        target = button
    return _action(_toward(hand, target), 1.0)


def _fast_window(direction: float):
    def controller(s: np.ndarray) -> np.ndarray:
        hand, handle = s[0:3], s[4:7] + np.array([-0.03 * direction, -0.03, -0.08])
        if np.linalg.norm(hand[:2] - handle[:2]) > 0.04:
            target = _cone(handle, hand, 0.3, 0.25)
        elif abs(hand[2] - handle[2]) > 0.02:
            target = handle
        else:
            target = handle + [0.1 * direction, 0.0, 0.0]
        return _action(_toward(hand, target), 1.0)

    return controller


FAST_CONTROLLERS = {
    "reach-v3": _fast_reach,
    "push-v3": _fast_push,
    "pick-place-v3": _fast_pick_place,
    "drawer-open-v3": _fast_drawer_open,
    "drawer-close-v3": _fast_drawer_close,
    "button-press-topdown-v3": _fast_button_press_topdown,
    "window-open-v3": _fast_window(1.0),
    "window-close-v3": _fast_window(-1.0),
}


class FastScriptedExpert(ScriptedExpert):
    """The scripted experts with their corners cut: same phases and contacts, full speed, cone approaches.

    A faster demonstration source (``vlapt collect expert=scripted-fast``) and reference row
    (``vlapt eval --policy scripted-fast``); tasks without a faster controller (door-open,
    peg-insert-side, every task outside MT10) run MetaWorld's own.
    """

    name = "scripted-fast"

    def raw_action(self, state: np.ndarray, task: str) -> np.ndarray:
        controller = FAST_CONTROLLERS.get(task)
        if controller is None:
            return super().raw_action(state, task)
        return controller(np.asarray(state, dtype=np.float64))


EXPERTS = {"scripted": ScriptedExpert, "scripted-fast": FastScriptedExpert}


def make_expert(name: str) -> ScriptedExpert:
    if name not in EXPERTS:
        raise ValueError(f"unknown expert {name!r}; valid experts: {', '.join(EXPERTS)}")
    return EXPERTS[name]()
