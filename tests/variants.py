"""Flag variants of Lamb/Lars that the presets do not cover (shared by the trajectory and sync-free tests), so
every branch of every path runs."""

FLAG_VARIANTS = {
    "lamb_l2": ("lamb", dict(weight_decay_mode="l2")),
    "lamb_outside": ("lamb", dict(weight_decay_mode="decoupled_outside", lr=0.05)),
    "lamb_step_size": ("lamb", dict(bias_correction="step_size", eps_inside_sqrt=True)),
    "lamb_n": ("lamb", dict(nesterov="n-lamb", grad_averaging=False)),
    "lamb_nn": ("lamb", dict(nesterov="nn-lamb", phi="clamp_ratio", phi_min=0.5, phi_max=2.0)),
    "lars_nesterov": ("lars", dict(nesterov=True, grad_averaging=False, phi="clamp_norm", phi_max=1.0)),
    "lars_2017_nesterov": ("lars", dict(mode="2017", nesterov=True, max_grad_norm=1.0)),
}
