"""Label-efficient training strategies (registry ``STRATEGIES``)."""
from .augpaint import AugPaint
from .base import STRATEGIES, LabelLeakError, StepOutput, Strategy, StrategyConfig, build_strategy, register_strategy
from .bcp import BCP, BCPPretrain
from .bn_sfda import BNSFDA
from .contrastive import ContrastiveGlobal, ContrastiveLocal
from .cuts import CUTS
from .cyclegan_pl import CycleGANPseudoLabels
from .desco import DeSCO
from .dsaif import DSAIF
from .mean_teacher import MeanTeacher
from .sdc_uda import SDCUDASelfTrain, SDCUDATranslate
from .supervised import Supervised
from .upl_sfda import UPLSFDA

__all__ = ["AugPaint", "BCP", "BCPPretrain", "BNSFDA", "CUTS", "CycleGANPseudoLabels", "ContrastiveGlobal", "DeSCO", "ContrastiveLocal", "DSAIF", "UPLSFDA", "STRATEGIES",
           "LabelLeakError", "MeanTeacher", "SDCUDASelfTrain", "SDCUDATranslate", "StepOutput", "Strategy", "StrategyConfig", "Supervised", "build_strategy",
           "register_strategy"]
