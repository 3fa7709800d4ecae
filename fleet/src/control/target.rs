//! What a call runs on, fleet-wide: `host/vm`, `host/*` (every VM of a host), `key=value`
//! (every VM whose label, or whose host's label, has that value), `*`, or a comma list of
//! those. The same selectors say which VMs a principal may use.

use std::collections::BTreeMap;

/// A VM as the control plane knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetVm {
    /// Its host.
    pub host: String,
    /// Its name on the host.
    pub name: String,
    /// Its labels, over its host's.
    pub labels: BTreeMap<String, String>,
}

impl FleetVm {
    /// `host/vm`.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.host, self.name)
    }
}

/// One selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// `*`.
    All,
    /// `host/*`.
    Host(String),
    /// `host/vm`.
    Vm(String, String),
    /// `key=value`.
    Label(String, String),
}

fn is_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

impl Selector {
    /// Parses one selector.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "*" {
            return Ok(Self::All);
        }
        if let Some((k, v)) = s.split_once('=') {
            return if is_name(k) && is_name(v) {
                Ok(Self::Label(k.to_owned(), v.to_owned()))
            } else {
                Err(format!(
                    "{s:?} is not a valid label selector: expected key=value, each 1 to 63 of \
                     A-Z a-z 0-9 _ . -"
                ))
            };
        }
        match s.split_once('/') {
            Some((h, "*")) if is_name(h) => Ok(Self::Host(h.to_owned())),
            Some((h, v)) if is_name(h) && is_name(v) => Ok(Self::Vm(h.to_owned(), v.to_owned())),
            _ => Err(format!(
                "{s:?} is not a fleet target: expected host/vm, host/*, key=value or *"
            )),
        }
    }

    /// Whether `vm` is selected.
    pub fn matches(&self, vm: &FleetVm) -> bool {
        match self {
            Self::All => true,
            Self::Host(h) => vm.host == *h,
            Self::Vm(h, v) => vm.host == *h && vm.name == *v,
            Self::Label(k, v) => vm.labels.get(k).is_some_and(|x| x == v),
        }
    }
}

/// A target: one or more selectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target(pub Vec<Selector>);

impl Target {
    /// Parses a target as written in a request.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err(
                "empty target: expected host/vm, host/*, key=value, * or a comma list".into(),
            );
        }
        s.split(',')
            .map(Selector::parse)
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// The VMs of `vms` selected, in `vms`' order; an error naming the `host/vm`s that
    /// are not there, or saying that nothing matched.
    pub fn select<'a>(&self, vms: &'a [FleetVm]) -> Result<Vec<&'a FleetVm>, String> {
        let missing: Vec<String> = self
            .0
            .iter()
            .filter_map(|s| match s {
                Selector::Vm(h, v) if !vms.iter().any(|x| x.host == *h && x.name == *v) => {
                    Some(format!("\"{h}/{v}\""))
                }
                Selector::Host(h) if !vms.iter().any(|x| x.host == *h) => {
                    Some(format!("\"{h}/*\""))
                }
                _ => None,
            })
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "unknown vm{}: {}",
                if missing.len() == 1 { "" } else { "s" },
                missing.join(", ")
            ));
        }
        let chosen: Vec<&FleetVm> = vms
            .iter()
            .filter(|vm| self.0.iter().any(|s| s.matches(vm)))
            .collect();
        if chosen.is_empty() {
            return Err("no vm matches the target".into());
        }
        Ok(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(host: &str, name: &str, labels: &[(&str, &str)]) -> FleetVm {
        FleetVm {
            host: host.into(),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        }
    }

    #[test]
    fn targets_select_in_order() {
        let vms = [
            vm("a", "x", &[("role", "web")]),
            vm("a", "y", &[]),
            vm("b", "x", &[("role", "web")]),
        ];
        let names = |t: &str| -> Result<Vec<String>, String> {
            Ok(Target::parse(t)?
                .select(&vms)?
                .iter()
                .map(|v| v.full_name())
                .collect())
        };
        assert_eq!(names("*").unwrap(), ["a/x", "a/y", "b/x"]);
        assert_eq!(names("role=web").unwrap(), ["a/x", "b/x"]);
        assert_eq!(names("a/*").unwrap(), ["a/x", "a/y"]);
        assert_eq!(names("b/x,a/y").unwrap(), ["a/y", "b/x"]);
        assert!(names("c/x").unwrap_err().contains("\"c/x\""));
        assert!(names("role=db").unwrap_err().contains("no vm"));
        assert!(Target::parse("x").is_err());
        assert!(Target::parse("a/").is_err());
        assert!(Target::parse("").is_err());
        assert!(Target::parse("a/x,").is_err());
    }
}
