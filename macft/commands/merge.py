"""`macft merge`: one LoRA adapter from several trained on the same base (PEFT's add_weighted_adapter)."""

from __future__ import annotations

import json

import click

from macft.adapters.merge import METHODS, SIGN_METHODS


def parse_weights(ctx, param, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(part) for part in value.replace(" ", ",").split(",") if part]
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of numbers, e.g. 0.7,0.3.") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "-o", required=True, type=click.Path(), help="The merged run directory (usable as --adapter by every command).")
@click.option("--method", type=click.Choice(METHODS), default="linear", show_default=True, help="How A and B are combined (see below).")
@click.option("--weights", "-w", callback=parse_weights, default=None, help="One weight per adapter, comma-separated, e.g. 0.7,0.3 (default: 1 each).")
@click.option("--density", type=float, default=None, help="ties/dare/dare_ties: the fraction of each adapter's values kept (0 < d <= 1).")
@click.option("--sign", type=click.Choice(SIGN_METHODS), default=None, help="ties/dare_ties: elect each entry's sign by the kept values' sum (total, default) or by count (frequency).")
@click.option("--seed", type=int, default=0, show_default=True, help="dare/dare_ties: seed of the random drop.")
@click.option("--force", is_flag=True, help="Replace --out even when it is not an earlier `macft merge` output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def merge(adapters, out, method, weights, density, sign, seed, force, as_json):
    """Merge LoRA adapters trained on the same base into one, as Hugging Face PEFT's
    add_weighted_adapter does. With adapter i's A_i, B_i, scale s_i = alpha_i/r_i and weight w_i:

    \b
      cat        A = [w_i s_i A_i ...], B = [B_i ...]: rank sum(r_i), delta = sum w_i delta_i exactly
      linear     A = sum c_i A_i, B = sum c_i B_i with c_i = sqrt(w_i s_i) (equal ranks; cross terms)
      ties       per matrix: keep the top --density by magnitude, elect signs, mean of agreeing c_i values
      dare       per matrix: drop values at random (keep --density), rescale by 1/density, sum c_i values
      dare_ties  dare's random drop, then ties' sign election and mean

    The merged adapter has alpha = rank (scale 1) and adapts the union of the adapters' layers. DoRA and
    non-LoRA adapters, and adapters of different bases, are refused.

    \b
    Examples:
      macft merge runs/json runs/dates --method cat --out runs/json+dates
      macft merge runs/json runs/dates --method ties --density 0.5 --weights 1,1 --out runs/ties
      macft generate --adapter runs/json+dates -p "Date: 5 March 2021\\nISO:" --no-chat
    """
    from macft.adapters.merge import merge_adapters

    result = merge_adapters(list(adapters), out, weights=weights, method=method, density=density, sign=sign, seed=seed, force=force)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(f"Merged {len(result.sources)} adapters ({result.method}, weights {result.weights}) into rank {result.rank} over {result.layers} layers → {result.path}")
    click.echo(f"Next: macft chat --adapter {result.path}")
