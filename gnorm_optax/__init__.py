"""gnorm_optax: optax transformations that steer training toward flat minima."""

from gnorm_optax._src.adaptive import adan
from gnorm_optax._src.adaptive import adaptive_gradient_regularization
from gnorm_optax._src.adaptive import agr_adamw
from gnorm_optax._src.adaptive import agr_adan
from gnorm_optax._src.base import Probe
from gnorm_optax._src.base import RefreshPolicy
from gnorm_optax._src.base import SecondGradientState
from gnorm_optax._src.base import second_gradient_transformation
from gnorm_optax._src.ensemble import ensemble_axes
from gnorm_optax._src.finite_difference import finite_difference_gr
from gnorm_optax._src.finite_difference import gradient_regularization
from gnorm_optax._src.flooding import FloodingState
from gnorm_optax._src.flooding import flooding
from gnorm_optax._src.penalty import gsam
from gnorm_optax._src.penalty import penalized_grad
from gnorm_optax._src.penalty import sam
from gnorm_optax._src.sharpness import EigenInfo
from gnorm_optax._src.sharpness import filter_normalized_direction
from gnorm_optax._src.sharpness import hessian_spectral_density
from gnorm_optax._src.sharpness import hessian_top_eigenvalue
from gnorm_optax._src.sharpness import hessian_top_eigenvalues
from gnorm_optax._src.sharpness import hessian_trace
from gnorm_optax._src.sharpness import hvp
from gnorm_optax._src.sharpness import loss_landscape

__version__ = "0.1.0"

__all__ = (
  "EigenInfo",
  "FloodingState",
  "Probe",
  "RefreshPolicy",
  "SecondGradientState",
  "adan",
  "adaptive_gradient_regularization",
  "agr_adamw",
  "agr_adan",
  "ensemble_axes",
  "filter_normalized_direction",
  "finite_difference_gr",
  "flooding",
  "gradient_regularization",
  "gsam",
  "hessian_spectral_density",
  "hessian_top_eigenvalue",
  "hessian_top_eigenvalues",
  "hessian_trace",
  "hvp",
  "loss_landscape",
  "penalized_grad",
  "sam",
  "second_gradient_transformation",
)
