"""Pydantic's validation errors as readable lines, for every boundary that reports them to a person or a
program: a job (InvalidJob), a gateway token, a setting (InvalidSettings). The input values are never
repeated: a setting's may be a secret."""

from __future__ import annotations

from pydantic import ValidationError


def validation_problems(error: ValidationError, whole: str = "job") -> tuple[tuple[str, str], ...]:
    """(field path, reason) per problem: `("width", "Input should be a multiple of 16")`; `whole` names a
    problem of the whole model (a model validator's)."""
    problems = []
    for problem in error.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in problem["loc"]) or whole
        if problem["type"] == "extra_forbidden":
            reason = "unknown field"
        elif problem["type"] == "value_error":  # our validators' own words, without pydantic's "Value error, "
            reason = str(problem.get("ctx", {}).get("error", problem["msg"]))
        else:
            reason = problem["msg"]
        problems.append((where, reason))
    return tuple(problems)


def describe_validation_error(error: ValidationError) -> str:
    """One readable line for every problem: `width: Input should be a multiple of 16; seed: ...`."""
    return "; ".join(f"{where}: {reason}" for where, reason in validation_problems(error))
