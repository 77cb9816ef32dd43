"""MetaWorld task names, the MT10 and MT50 task sets, and the language instruction written for each task.

The instruction is what the policy reads; it names the object and the goal the way a
person would ask a robot, and is fixed per task so results compare across runs.
"""

from __future__ import annotations

import re

from vlapt.interfaces import UnknownTaskError

INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "pick up the nut and fit it onto the peg",
    "basketball-v3": "pick up the ball and dunk it into the basket",
    "bin-picking-v3": "pick up the cube and move it into the other bin",
    "box-close-v3": "pick up the lid and close the box with it",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "press the button from the top behind the wall",
    "button-press-v3": "press the button from the front",
    "button-press-wall-v3": "press the button from the front behind the wall",
    "coffee-button-v3": "push the button on the coffee machine",
    "coffee-pull-v3": "pull the mug away from the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "rotate the dial a full turn",
    "disassemble-v3": "pick the nut off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "turn the lock to lock the door",
    "door-open-v3": "open the door by pulling the handle",
    "door-unlock-v3": "turn the lock to unlock the door",
    "hand-insert-v3": "insert the gripper into the hole",
    "drawer-close-v3": "push the drawer closed",
    "drawer-open-v3": "pull the drawer open",
    "faucet-open-v3": "rotate the faucet handle to open it",
    "faucet-close-v3": "rotate the faucet handle to close it",
    "hammer-v3": "pick up the hammer and hammer the nail into the wall",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "peg-insert-side-v3": "pick up the peg and insert it into the hole from the side",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "pick-out-of-hole-v3": "pick the peg out of the hole",
    "reach-v3": "reach the goal position with the gripper",
    "push-back-v3": "push the puck back to the goal",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate into the cabinet",
    "plate-slide-side-v3": "slide the plate into the cabinet from the side",
    "plate-slide-back-v3": "slide the plate out of the cabinet",
    "plate-slide-back-side-v3": "slide the plate out of the cabinet to the side",
    "peg-unplug-side-v3": "unplug the peg sideways",
    "soccer-v3": "kick the soccer ball into the goal",
    "stick-push-v3": "grasp the stick and push the box with it",
    "stick-pull-v3": "grasp the stick and pull the box with it",
    "push-wall-v3": "push the puck past the wall to the goal",
    "reach-wall-v3": "reach the goal position behind the wall",
    "shelf-place-v3": "pick up the puck and place it on the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}

MT10: tuple[str, ...] = (
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "window-close-v3",
)
MT50: tuple[str, ...] = tuple(INSTRUCTIONS)


def check_task(task: str) -> str:
    if task not in INSTRUCTIONS:
        stem = re.sub(r"-v\d+$", "", str(task))
        close = [t for t in INSTRUCTIONS if stem and stem in t]
        hint = f" Did you mean {', '.join(close[:3])}?" if close else ""
        raise UnknownTaskError(
            f"unknown task {task!r}.{hint} Valid tasks are the 50 MetaWorld v3 names, e.g. "
            f"{', '.join(MT10)} (see `vlapt tasks --suite mt50`)."
        )
    return task


def task_index(task: str) -> int:
    """Stable index of a task among the 50 (used to derive per-task seeds)."""
    return MT50.index(check_task(task))
