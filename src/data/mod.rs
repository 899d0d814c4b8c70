//! The data layer (issue 3): readers for the datasets the defence, attacks and evaluations use.
