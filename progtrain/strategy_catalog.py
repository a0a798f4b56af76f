"""The built-in init strategies' names and options text, for ``progtrain grow --help``.

Snapshot of :func:`progtrain.init.available_strategies` and :func:`progtrain.init.options_help`,
kept here because the strategies live in modules that import torch, and ``progtrain --help`` must not
(it answers in well under 2 s; importing torch alone takes longer on a loaded 2-core machine).
``tests/test_everyday.py`` checks it against the live registry; after changing a strategy or its
options, regenerate it with ``python -m progtrain.strategy_catalog``. Running ``grow`` itself uses
the live registry (an unknown name is refused there, listing the registered ones).
"""

STRATEGIES = ('aki', 'function_preserving', 'gradinit', 'gradmax', 'mixture', 'random', 'signed_split', 'variance_transfer')

OPTIONS_HELP = ('aki: Advanced knowledge initialization (bert2BERT, Chen et al. 2021): new FFN units and heads of\n'
 '    layer l copy the units of layer l+1 (the top layer: its own), fan-out zero, exact (see the\n'
 '    module docstring).\n'
 '  scale (float, default 1.0): std of the free matrix entries relative to the std of the trained\n'
 '      tensor they join\n'
 'function_preserving: Free matrix entries ~ N(0, (scale * std_old)^2), where std_old is the std of\n'
 '    the trained tensor they join; free vector entries (biases) are 0.\n'
 '  scale (float, default 1.0): std of the free matrix entries relative to the std of the trained\n'
 '      tensor they join\n'
 'gradinit: Grow as ``function_preserving``, then tune one scale per parameter tensor with GradInit\n'
 '    (Zhu et al. 2021) on the calibration batches (``grow(data=...)``) and bake it in. Needs\n'
 '    calibration data.\n'
 '  scale (float, default 1.0): std of the free matrix entries relative to the std of the trained\n'
 '      tensor they join\n'
 '  only_new (bool, default True): scale only tensors with new elements (False: every tensor)\n'
 '  iters (int, default 300): GradInit iterations (one Adam step on the scales each)\n'
 '  lr (float, default 0.005): Adam learning rate of the scales\n'
 '  eta (float, default 0.001): look-ahead step of the simulated optimiser (parameter units per step)\n'
 '  alpha (float, default 0.01): lower bound of every scale\n'
 '  gamma (float | None, default None): gradient-norm bound (None: the largest norm over the batches\n'
 '      at scales 1)\n'
 "  optimizer ('adam' | 'sgd', default 'adam'): simulated optimiser: adam (sign step, L1 norm) or sgd\n"
 'gradmax: New FFN units with zero fan-in and fan-out from the top singular vectors of the gradient\n'
 '    correlation ``M`` (GradMax, Evci et al. 2022; see the module docstring), on calibration batches\n'
 '    (``grow(data=...)``). Needs calibration data.\n'
 '  scale (float, default 1.0): std of the free matrix entries relative to the std of the trained\n'
 '      tensor they join\n'
 "  fanout_scale (float, default 1.0): magnitude of the new units' fan-out columns (see scale_method)\n"
 "  scale_method ('mean_norm' | 'fixed', default 'mean_norm'): fan-out magnitude: fanout_scale x the\n"
 "      old columns' mean norm, or fanout_scale itself\n"
 '  seed (int, default 0): seed of the random columns added when there are fewer singular vectors than\n'
 '      units\n'
 'mixture: MixtureGrowth init (see the module docstring): new blocks of templated weights are new\n'
 "    mixtures of the layer's trained templates.\n"
 "  exact (bool, default True): keep the new units' fan-out zero and the function exact\n"
 "  coefficients ('alternate' | 'orthogonal' | 'least_covered', default 'alternate'): rule for the new\n"
 "      blocks' template coefficients\n"
 "  coef_scale (float, default 1.0): norm of new coefficient vectors relative to the old ones' mean\n"
 '      norm\n'
 '  num_templates (int, default 4): templates per layer when the bank is derived from a plain model\n'
 '  noise (float, default 1.0): noise of the templates derived from a plain model\n'
 "  roles (list of str, default ['q', 'k', 'v', 'qkv', 'o', 'up', 'gate', 'down']): roles of the\n"
 '      templated weights (progtrain.arch.ROLES)\n'
 "random: New entries drawn as a fresh model's (N(0, initializer_range^2) matrices, unit gains, zero\n"
 '    biases); old entries copied unchanged. Not function-preserving.\n'
 "  std (float | None, default None): std of new matrix entries (None: the config's initializer_range)\n"
 'signed_split: Grow FFN width by splitting the units with the largest predicted loss decrease\n'
 '    (positive or signed split, Liu et al. 2019 and Wu et al. 2020; see the module docstring),\n'
 '    measured on calibration batches (``grow(data=...)``). Needs calibration data.\n'
 '  scale (float, default 1.0): std of the free matrix entries relative to the std of the trained\n'
 '      tensor they join\n'
 '  eps (float, default 0.01): relative split step; 0.01 is the second-order regime where the\n'
 '      predicted loss change is accurate (MiniLM-L6, 1536 -> 2048 units: eps 0.01 predicted -0.454 /\n'
 '      realised -0.456, eps 0.05 predicted -11.4 / realised -2.9)\n'
 "  signed_weight (float, default 1.0): c: a signed split's weights are 1+c and -c\n"
 '  allow_signed (bool, default True): allow signed splits (False: positive splits only)\n'
 "  lanczos_steps (int, default 10): Lanczos iterations per unit for the splitting matrix's extreme\n"
 '      eigenpairs\n'
 '  seed (int, default 0): seed of the Lanczos start vectors\n'
 'variance_transfer: Variance transfer (Yuan, Savarese & Maire 2023): old weights rescaled to their\n'
 '    new fan-in, new blocks drawn at the fan-in rule (see the module docstring).\n'
 "  rescale ('sqrt' | 'linear' | 'none', default 'sqrt'): rescale of old weights whose fan-in grows:\n"
 '      (n_old/n_new)**p with p = 1/2 (sqrt), 1 (linear), or none\n'
 "  fan_out ('zero' | 'paired', default 'zero'): new FFN units' fan-out: zero, or paired (+Z/-Z pairs\n"
 '      that cancel exactly)\n'
 '  measure (bool, default True): measure the per-block logit deviation of the rescale after growth')


def render() -> str:
    """This module's source regenerated from the live registry (imports torch)."""
    import pprint

    from progtrain.init import available_strategies, options_help

    src = open(__file__).read()
    head, _, _ = src.partition("STRATEGIES = ")
    _, _, tail = src.partition("\n\n\ndef render()")
    return (f"{head}STRATEGIES = {tuple(available_strategies())!r}\n\nOPTIONS_HELP = "
            f"{pprint.pformat(options_help(), width=110)}\n\n\ndef render(){tail}")


if __name__ == "__main__":
    text = render()
    with open(__file__, "w") as f:
        f.write(text)
