// Command step-ca is Strongroom's build of the smallstep CA from Debian's packaged Go source
// (golang-github-smallstep-certificates-dev): the upstream command is not packaged, so this is the
// minimal equivalent of its main package. It runs `step-ca <ca.json> --password-file <file>`.
package main

import (
	"fmt"
	"os"

	"github.com/smallstep/certificates/commands"
	"github.com/urfave/cli"

	// The soft CAS signs with the intermediate key from ca.json; without it the authority cannot issue.
	_ "github.com/smallstep/certificates/cas/softcas"
)

func main() {
	app := cli.NewApp()
	app.Name = "step-ca"
	app.HelpName = "step-ca"
	app.Usage = "an online certificate authority (Strongroom build)"
	app.UsageText = commands.AppCommand.UsageText
	app.Version = "0.19.0-strongroom"
	app.Action = commands.AppCommand.Action
	app.Flags = commands.AppCommand.Flags
	if err := app.Run(os.Args); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
