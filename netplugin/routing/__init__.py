"""Routing: BIRD 2 config rendering (model, bird_config), running and reloading BIRD (bird), and direct mode
(direct) which programs other hosts' blocks as kernel routes without a BGP daemon."""
