"""A pre-generation router learned from the suite: per rung, P(its answer is right) from the
request, so a climb can start where the answer is and skip rungs predicted to fail.

Runtime (the engine): :func:`load_router` on the config's ``[router]`` table, then
``Router.route(messages, metadata)`` before the first call. Tuning (``cascade tune``):
:func:`tune_router`, :func:`write_router`, :func:`router_toml`. Replay (``cascade eval``):
:func:`route_cases` and :func:`replay_routes`.
"""

from cascade.routing.choose import RouteChoice, RouteSetting, choose_route_setting, simulate_routed
from cascade.routing.model import RouterModel, read_model
from cascade.routing.runtime import Route, Router, load_router
from cascade.routing.tuning import (
    FittedRouter,
    RoutedCases,
    RouterTuning,
    fit_router,
    replay_routes,
    route_cases,
    router_toml,
    tune_router,
    write_router,
)

__all__ = ["FittedRouter", "Route", "RouteChoice", "RouteSetting", "RoutedCases", "Router",
           "RouterModel", "RouterTuning", "choose_route_setting", "fit_router", "load_router",
           "read_model", "replay_routes", "route_cases", "router_toml", "simulate_routed",
           "tune_router", "write_router"]
