//! BeaverTails' 14 harm categories and the category groups the paper's generalisation
//! experiments use (Section 4.3 / Table 4: defend on one group, attack with another).
//!
//! The group mapping is the one in the authors' public experiment code:
//!
//! | group | BeaverTails categories |
//! |---|---|
//! | `half` | violence,aiding_and_abetting,incitement; hate_speech,offensive_language; discrimination,stereotype,injustice; misinformation_regarding_ethics,laws_and_safety; privacy_violation |
//! | `other_half` | financial_crime,property_crime,theft; drug_abuse,weapons,banned_substance; terrorism,organized_crime; sexually_explicit,adult_content |
//! | `violence` | violence,aiding_and_abetting,incitement |
//! | `toxic` | hate_speech,offensive_language; discrimination,stereotype,injustice |
//! | `privacy_misinformation` | misinformation_regarding_ethics,laws_and_safety; privacy_violation |
//! | `crime_unethical` | financial_crime,property_crime,theft; drug_abuse,weapons,banned_substance; non_violent_unethical_behavior; terrorism,organized_crime |
//! | `sexually_explicit` | sexually_explicit,adult_content |
//! | `self_harm` | self_harm |
//!
//! `half` and `other_half` are disjoint but do not cover everything: animal_abuse, child_abuse,
//! controversial_topics,politics, non_violent_unethical_behavior and self_harm are in neither.
//! The reference code assigns each sample to its *primary* category, the first true one in
//! BeaverTails' (alphabetical) category order, and tests group membership on that;
//! [`GroupMatch::Primary`] reproduces this, [`GroupMatch::Any`] uses every flagged category.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One of BeaverTails' 14 harm categories, named exactly as in its `category` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HarmCategory {
    AnimalAbuse,
    ChildAbuse,
    ControversialTopicsPolitics,
    DiscriminationStereotypeInjustice,
    DrugAbuseWeaponsBannedSubstance,
    FinancialCrimePropertyCrimeTheft,
    HateSpeechOffensiveLanguage,
    MisinformationEthicsLawsSafety,
    NonViolentUnethicalBehavior,
    PrivacyViolation,
    SelfHarm,
    SexuallyExplicitAdultContent,
    TerrorismOrganizedCrime,
    ViolenceAidingAbettingIncitement,
}

impl HarmCategory {
    /// All 14, in BeaverTails' order (alphabetical by name).
    pub const ALL: [HarmCategory; 14] = [
        Self::AnimalAbuse,
        Self::ChildAbuse,
        Self::ControversialTopicsPolitics,
        Self::DiscriminationStereotypeInjustice,
        Self::DrugAbuseWeaponsBannedSubstance,
        Self::FinancialCrimePropertyCrimeTheft,
        Self::HateSpeechOffensiveLanguage,
        Self::MisinformationEthicsLawsSafety,
        Self::NonViolentUnethicalBehavior,
        Self::PrivacyViolation,
        Self::SelfHarm,
        Self::SexuallyExplicitAdultContent,
        Self::TerrorismOrganizedCrime,
        Self::ViolenceAidingAbettingIncitement,
    ];

    /// The BeaverTails key, e.g. `"drug_abuse,weapons,banned_substance"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::AnimalAbuse => "animal_abuse",
            Self::ChildAbuse => "child_abuse",
            Self::ControversialTopicsPolitics => "controversial_topics,politics",
            Self::DiscriminationStereotypeInjustice => "discrimination,stereotype,injustice",
            Self::DrugAbuseWeaponsBannedSubstance => "drug_abuse,weapons,banned_substance",
            Self::FinancialCrimePropertyCrimeTheft => "financial_crime,property_crime,theft",
            Self::HateSpeechOffensiveLanguage => "hate_speech,offensive_language",
            Self::MisinformationEthicsLawsSafety => {
                "misinformation_regarding_ethics,laws_and_safety"
            }
            Self::NonViolentUnethicalBehavior => "non_violent_unethical_behavior",
            Self::PrivacyViolation => "privacy_violation",
            Self::SelfHarm => "self_harm",
            Self::SexuallyExplicitAdultContent => "sexually_explicit,adult_content",
            Self::TerrorismOrganizedCrime => "terrorism,organized_crime",
            Self::ViolenceAidingAbettingIncitement => "violence,aiding_and_abetting,incitement",
        }
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

impl fmt::Display for HarmCategory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HarmCategory {
    type Err = String;
    /// Parse a BeaverTails key (surrounding whitespace ignored); an unknown name's error lists
    /// the accepted ones.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim();
        Self::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown harm category `{s}`; BeaverTails categories are: {}",
                    Self::ALL.map(|c| c.name()).join("; ")
                )
            })
    }
}

impl Serialize for HarmCategory {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for HarmCategory {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A set of harm categories (a 14-bit set; iteration is in BeaverTails' order).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HarmCategories(u16);

impl HarmCategories {
    pub const EMPTY: Self = Self(0);

    pub fn from_slice(cats: &[HarmCategory]) -> Self {
        let mut s = Self::EMPTY;
        for &c in cats {
            s.insert(c);
        }
        s
    }

    pub fn insert(&mut self, c: HarmCategory) {
        self.0 |= c.bit();
    }

    pub fn contains(self, c: HarmCategory) -> bool {
        self.0 & c.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    pub fn intersects(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }

    pub fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// The flagged categories in BeaverTails' order.
    pub fn iter(self) -> impl Iterator<Item = HarmCategory> {
        HarmCategory::ALL
            .into_iter()
            .filter(move |c| self.contains(*c))
    }

    /// The first flagged category in BeaverTails' order (the reference code's per-sample label).
    pub fn primary(self) -> Option<HarmCategory> {
        self.iter().next()
    }
}

impl fmt::Display for HarmCategories {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.iter().map(HarmCategory::name).collect();
        write!(f, "[{}]", names.join("; "))
    }
}

impl Serialize for HarmCategories {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for HarmCategories {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = Vec::<HarmCategory>::deserialize(d)?;
        Ok(Self::from_slice(&v))
    }
}

/// A named group of harm categories (see the module table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HarmGroup {
    Half,
    OtherHalf,
    Violence,
    Toxic,
    PrivacyMisinformation,
    CrimeUnethical,
    SexuallyExplicit,
    SelfHarm,
}

impl HarmGroup {
    pub const ALL: [HarmGroup; 8] = [
        Self::Half,
        Self::OtherHalf,
        Self::Violence,
        Self::Toxic,
        Self::PrivacyMisinformation,
        Self::CrimeUnethical,
        Self::SexuallyExplicit,
        Self::SelfHarm,
    ];

    /// The group's name as the paper's code and our CLI spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Half => "half",
            Self::OtherHalf => "other_half",
            Self::Violence => "violence",
            Self::Toxic => "toxic",
            Self::PrivacyMisinformation => "privacy_misinformation",
            Self::CrimeUnethical => "crime_unethical",
            Self::SexuallyExplicit => "sexually_explicit",
            Self::SelfHarm => "self_harm",
        }
    }

    /// The BeaverTails categories in the group.
    pub fn categories(self) -> HarmCategories {
        use HarmCategory as C;
        let cats: &[HarmCategory] = match self {
            Self::Half => &[
                C::ViolenceAidingAbettingIncitement,
                C::HateSpeechOffensiveLanguage,
                C::DiscriminationStereotypeInjustice,
                C::MisinformationEthicsLawsSafety,
                C::PrivacyViolation,
            ],
            Self::OtherHalf => &[
                C::FinancialCrimePropertyCrimeTheft,
                C::DrugAbuseWeaponsBannedSubstance,
                C::TerrorismOrganizedCrime,
                C::SexuallyExplicitAdultContent,
            ],
            Self::Violence => &[C::ViolenceAidingAbettingIncitement],
            Self::Toxic => &[
                C::HateSpeechOffensiveLanguage,
                C::DiscriminationStereotypeInjustice,
            ],
            Self::PrivacyMisinformation => {
                &[C::MisinformationEthicsLawsSafety, C::PrivacyViolation]
            }
            Self::CrimeUnethical => &[
                C::FinancialCrimePropertyCrimeTheft,
                C::DrugAbuseWeaponsBannedSubstance,
                C::NonViolentUnethicalBehavior,
                C::TerrorismOrganizedCrime,
            ],
            Self::SexuallyExplicit => &[C::SexuallyExplicitAdultContent],
            Self::SelfHarm => &[C::SelfHarm],
        };
        HarmCategories::from_slice(cats)
    }

    /// Whether a sample with `cats` belongs to the group under `how`.
    pub fn matches(self, cats: HarmCategories, how: GroupMatch) -> bool {
        let group = self.categories();
        match how {
            GroupMatch::Primary => cats.primary().is_some_and(|c| group.contains(c)),
            GroupMatch::Any => cats.intersects(group),
        }
    }
}

impl fmt::Display for HarmGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HarmGroup {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|g| g.name() == s.trim())
            .ok_or_else(|| {
                Error::setting(
                    "harm group",
                    s,
                    format!(
                        "expected one of: {}",
                        Self::ALL.map(|g| g.name()).join(", ")
                    ),
                )
            })
    }
}

/// How a multi-label sample is matched against a group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupMatch {
    /// Only the sample's primary (first flagged) category counts: the reference behaviour.
    #[default]
    Primary,
    /// Any flagged category in the group counts.
    Any,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_in_order() {
        let mut names: Vec<&str> = HarmCategory::ALL.iter().map(|c| c.name()).collect();
        for c in HarmCategory::ALL {
            assert_eq!(c.name().parse::<HarmCategory>().unwrap(), c);
        }
        let sorted = {
            let mut s = names.clone();
            s.sort();
            s
        };
        assert_eq!(names, sorted);
        names.dedup();
        assert_eq!(names.len(), 14);
        let e = "violence".parse::<HarmCategory>().unwrap_err();
        assert!(e.contains("unknown harm category `violence`"), "{e}");
    }

    #[test]
    fn halves_are_disjoint_and_groups_match_the_reference() {
        let h = HarmGroup::Half.categories();
        let o = HarmGroup::OtherHalf.categories();
        assert!(!h.intersects(o));
        assert_eq!(h.len(), 5);
        assert_eq!(o.len(), 4);
        assert_eq!(HarmGroup::CrimeUnethical.categories().len(), 4);
        assert!(HarmGroup::Toxic
            .categories()
            .contains(HarmCategory::DiscriminationStereotypeInjustice));
        for g in HarmGroup::ALL {
            assert_eq!(g.name().parse::<HarmGroup>().unwrap(), g);
            assert!(!g.categories().is_empty());
        }
        assert!("all".parse::<HarmGroup>().is_err());
    }

    #[test]
    fn primary_versus_any_matching() {
        // animal_abuse comes first, so it is the primary category; violence is second.
        let cats = HarmCategories::from_slice(&[
            HarmCategory::ViolenceAidingAbettingIncitement,
            HarmCategory::AnimalAbuse,
        ]);
        assert_eq!(cats.primary(), Some(HarmCategory::AnimalAbuse));
        assert!(!HarmGroup::Violence.matches(cats, GroupMatch::Primary));
        assert!(HarmGroup::Violence.matches(cats, GroupMatch::Any));
        assert!(!HarmGroup::Violence.matches(HarmCategories::EMPTY, GroupMatch::Any));
    }

    #[test]
    fn sets_serialise_as_name_lists() {
        let cats = HarmCategories::from_slice(&[HarmCategory::SelfHarm]);
        let j = serde_json::to_string(&cats).unwrap();
        assert_eq!(j, r#"["self_harm"]"#);
        let back: HarmCategories = serde_json::from_str(&j).unwrap();
        assert_eq!(back, cats);
    }
}
